"""`kda`: Kimi Delta Attention (Kimi Linear, 2025), the delta rule with a log-decay per key channel.

    q, k, v = silu(short_conv(proj(x)))                    as every delta kind (`DeltaKind`), L2-normalised q, k
    beta    = sigmoid(b_proj(x))                           [B, T, HV], b_proj without bias (fla)
    g       = -exp(A_log) · softplus(f_up(f_down(x)) + dt_bias)     [B, T, HV, K] log-decay <= 0 per key channel
    o       = o_proj(RMSNorm(delta_rule(q, k, v, beta, g)) · sigmoid(g_up(g_down(x))))
f_down / g_down: D -> r = head_dim (the rank fla's layer uses, its head_v_dim); A_log [HV], dt_bias [HV·K] (fla's
gate normaliser, `naive_kda_gate`). docs/model.md lists where lsp differs from fla's `KimiDeltaAttention`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..linear_kind import accumulation_dtype, register_kind
from ._delta import DeltaKind


@register_kind
class KimiDeltaAttention(DeltaKind):
    name = "kda"
    beta_bias = False
    gate_per_key = True

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        HV, Dh, D = cfg.num_v_heads, cfg.head_dim, cfg.hidden_size
        self.f_down = nn.Linear(D, Dh, bias=False)
        self.f_up = nn.Linear(Dh, HV * Dh, bias=False)
        self.A_log = nn.Parameter(torch.empty(HV).uniform_(1, 16).log())     # decay rates A ~ U(1, 16), as fla
        self.dt_bias = nn.Parameter(torch.zeros(HV * Dh))

    def make_output_gate(self) -> None:
        # the low-rank output gate D -> r -> HV·Dh, with a bias on the second factor (fla's g_proj)
        Dh = self.cfg.head_dim
        self.g_down = nn.Linear(self.cfg.hidden_size, Dh, bias=False)
        self.g_up = nn.Linear(Dh, self.cfg.num_v_heads * Dh, bias=True)

    def output_gate(self, x):
        # x: [B, T, D] -> [B, T, HV·Dh]
        return torch.sigmoid(self.g_up(self.g_down(x)))

    def decay(self, x):
        # x: [B, T, D] -> [B, T, HV, K] log-decay <= 0
        dtype = accumulation_dtype(x)
        f = self.f_up(self.f_down(x)).to(dtype) + self.dt_bias.to(dtype)
        g = -self.A_log.to(dtype).exp()[:, None] * F.softplus(f.view(*x.shape[:2], self.cfg.num_v_heads, -1))
        return g

    # ------------------------------------------------------------------------------------------ formulas
    @classmethod
    def gate_weights(cls, cfg) -> int:
        return (cfg.hidden_size + cfg.num_v_heads * cfg.head_dim) * cfg.head_dim          # f_down, f_up

    @classmethod
    def gate_parameters(cls, cfg) -> int:
        return cfg.num_v_heads + cfg.num_v_heads * cfg.head_dim                          # A_log, dt_bias

    @classmethod
    def output_gate_weights(cls, cfg) -> int:
        return (cfg.hidden_size + cfg.num_v_heads * cfg.head_dim) * cfg.head_dim          # g_down, g_up

    @classmethod
    def output_gate_parameters(cls, cfg) -> int:
        return cfg.num_v_heads * cfg.head_dim                                            # g_up's bias

    @classmethod
    def saved_bytes(cls, cfg, backend: str) -> dict:
        """The delta family's count, plus per token the low-rank gates' activations (f_down, g_down outputs, the
        fp32 gate through softplus and its scale, the sigmoid output gate) 4·Dh + 10·HV·Dh, and per padded token
        what a gate per key channel makes the chunked op keep beyond a gate per head: the decayed keys and queries
        of the sub-block pair products, 236·K - 1051 bytes per value head at the op's chunk C = 64, measured with
        saved_tensors_hooks on `delta_rule` (fp32, K = 16, 32, 64: within 4 bytes)."""
        base = super().saved_bytes(cfg, backend)
        HV, Dh = cfg.num_v_heads, cfg.head_dim
        return {**base, "token": base["token"] + 4 * Dh + 10 * HV * Dh,
                "padded": base["padded"] + HV * (236 * Dh - 1051)}
