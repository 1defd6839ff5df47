"""The decay-only family: gated linear attention (GLA / Lightning style), heads of head_dim for q, k and v.

    q, k, v = proj(x), through the kind's feature map (`features`)
    g       = the kind's log-decay (`log_decay`): None | [H] | [B, T, H] | [B, T, H, K], <= 0
    o       = o_proj(RMSNorm(linear_attention(q, k, v, g)) * silu(gate_proj(x)))      (GLA output gate)
A segment's map is A = Diag(exp Σg) (or a scalar, or the identity), so SP exchanges states and total decays.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lsp.names import CHUNK_SIZE
from lsp.ops import linear_attention
from lsp.parallel import sp_linear_attention

from ..cache import RecurrentState, recurrent_step
from ..layers import RMSNorm
from ..linear_kind import LinearKind, Recurrence


class DecayKind(LinearKind):
    """A decay-only kind; a subclass picks `features`, `decay` (the log-decay, with its parameters) and the
    formulas' gate terms: `gate_weights`, `gate_parameters`, `gate_dims` (log-decay values per head and token the
    op keeps; 0 when none or fixed)."""

    state_map = "diagonal"
    recurrence = Recurrence(single=linear_attention, parallel=sp_linear_attention, step=recurrent_step)

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        H, Dh, D = cfg.num_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, H * Dh, bias=False)
        self.v_proj = nn.Linear(D, H * Dh, bias=False)
        self.gate_proj = nn.Linear(D, H * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)
        self.o_norm = RMSNorm(Dh, cfg.norm_eps)

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q, k: [B, T, H, K] -> feature-mapped q, k (identity by default)
        return q, k

    def decay(self, x: torch.Tensor) -> torch.Tensor | None:
        # x: [B, T, D] -> log-decay None (no decay) by default
        return None

    def op_inputs(self, x, *, sp=None, cu_seqlens=None, cache=None) -> tuple:
        # x: [B, T, D] -> q, k, v [B, T, H, Dh], g
        B, T, _ = x.shape
        shape = (B, T, self.cfg.num_heads, self.cfg.head_dim)
        q, k = self.features(self.q_proj(x).view(shape), self.k_proj(x).view(shape))
        return q, k, self.v_proj(x).view(shape), self.decay(x)

    def output(self, o, x):
        # o: [B, T, H, Dh]; x: [B, T, D] -> [B, T, D]
        o = self.o_norm(o) * F.silu(self.gate_proj(x)).view(o.shape)
        return self.o_proj(o.reshape(*x.shape[:2], -1))

    def new_cache(self) -> RecurrentState:
        return RecurrentState()

    # ------------------------------------------------------------------------------------------ formulas
    @classmethod
    def gate_weights(cls, cfg) -> int:
        return 0

    @classmethod
    def gate_dims(cls, cfg) -> int:
        return 0

    @classmethod
    def gate_parameters(cls, cfg) -> int:
        return 0

    @classmethod
    def matmul_weights(cls, cfg) -> int:
        # q, k, v, output gate, o_proj + the decay projection
        return 5 * cfg.hidden_size * cfg.num_heads * cfg.head_dim + cls.gate_weights(cfg)

    @classmethod
    def other_parameters(cls, cfg) -> int:
        return cfg.head_dim + cls.gate_parameters(cfg)        # the per-head output RMSNorm + decay biases

    @classmethod
    def saved_bytes(cls, cfg, backend: str) -> dict:
        """Counted with saved-tensor hooks on fake tensors under bf16 autocast (lsp.plan.planner.saved_bytes):
        per token 10·D + 24·H·Dh + 4·H + 2·r (decay logits in fp32); the chunked torch path keeps per padded token
        50·H·Dh + 4·H·C + 4·H·Dh/C + 8·H·Dh²/C and under zigzag SP 6·H·Dh more per token (q and o0 of the
        incoming-state correction); the Triton custom ops keep q, k, v (bf16) and the fp32 decay, h recomputed."""
        D, H, Dh, C, r = cfg.hidden_size, cfg.num_heads, cfg.head_dim, CHUNK_SIZE, cfg.gate_low_rank_dim
        own = 10 * D + 24 * H * Dh + 4 * H + 2 * r
        if backend == "triton":
            return {"token": own + 6 * H * Dh + 4 * H * cls.gate_dims(cfg), "padded": 0, "segment": 4 * H * Dh * Dh,
                    "keys": 0}
        return {"token": own, "keys": 0,
                "padded": 50 * H * Dh + 4 * H * C + 4 * H * Dh / C + 8 * H * Dh * Dh / C,
                "segment": 4 * H * Dh * Dh, "incoming": 6 * H * Dh}

    @classmethod
    def exchange_payload(cls, cfg, rows: int, act_bytes: float) -> dict:
        # the total decay of a segment travels as a vector of K_g values per head (fp32)
        decay_dims = {"identity": 0, "scalar": 1, "diagonal": cfg.head_dim}[cls.state_map]
        return {"decay_bytes": rows * cfg.num_heads * decay_dims * 4, "halo_bytes": 0}
