"""The delta-rule family: DeltaNet / Gated DeltaNet (Yang et al. 2024, 2025; the Gated DeltaNet of Qwen3-Next).

    q, k, v = silu(short_conv(proj(x)))      causal depthwise conv, kernel cfg.delta_conv_size, per document
    q, k    = L2-normalised per head         (unit keys with beta in (0, 1) keep the state map contractive)
    beta    = sigmoid(b_proj(x))             [B, T, HV] write strength
    g       = the kind's log-decay (`decay`) None | [B, T, HV] | [B, T, HV, K]
    o       = o_proj(RMSNorm(delta_rule(q, k, v, beta, g)) * act(gate(x)))      act: silu (`output_gate`)
q, k have H = num_heads heads, v, beta, g and the state HV = num_v_heads (grouped value heads: value head j reads
q/k head j // G).
A segment's map A is a dense K x K matrix: SP exchanges affine maps [M | S] (lsp.parallel.delta), the conv takes
its halo from the previous segment; decoding keeps the conv's tail beside the state (`DeltaState`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lsp.names import CHUNK_SIZE
from lsp.ops import delta_rule
from lsp.parallel import sp_delta_rule

from ..cache import DeltaState, delta_recurrent_step
from ..layers import RMSNorm
from ..linear_kind import LinearKind, Recurrence, causal_conv


class DeltaKind(LinearKind):
    """A delta-rule kind; a subclass picks `decay` (with its parameters, `gate_weights`, `gate_parameters`)."""

    state_map = "dense"
    grouped_value_heads = True
    beta_bias = True               # b_proj's bias (fla's KDA has none)
    gate_per_key = False           # g [B, T, HV, K] (KDA) rather than [B, T, HV]: the kernels' FLOPs differ
    recurrence = Recurrence(single=delta_rule, parallel=sp_delta_rule, step=delta_recurrent_step)

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        H, HV, Dh, D, k = cfg.num_heads, cfg.num_v_heads, cfg.head_dim, cfg.hidden_size, cfg.delta_conv_size
        self.qkv_proj = nn.Linear(D, (2 * H + HV) * Dh, bias=False)
        self.b_proj = nn.Linear(D, HV, bias=self.beta_bias)
        self.o_proj = nn.Linear(HV * Dh, D, bias=False)
        self.o_norm = RMSNorm(Dh, cfg.norm_eps)
        self.conv_weight = nn.Parameter(torch.empty((2 * H + HV) * Dh, k).uniform_(-k**-0.5, k**-0.5))  # Conv1d's
        self.make_output_gate()

    def make_output_gate(self) -> None:
        """The output gate's projection(s), read by `output_gate`: one D -> HV·Dh matrix by default."""
        self.gate_proj = nn.Linear(self.cfg.hidden_size, self.cfg.num_v_heads * self.cfg.head_dim, bias=False)

    def output_gate(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, D] -> [B, T, HV·Dh], the factor on the normalised output
        return F.silu(self.gate_proj(x))

    def decay(self, x: torch.Tensor) -> torch.Tensor | None:
        # x: [B, T, D] -> log-decay None (DeltaNet) by default
        return None

    def op_inputs(self, x, *, sp=None, cu_seqlens=None, cache=None) -> tuple:
        # x: [B, T, D] -> q, k [B, T, H, Dh], v [B, T, HV, Dh], beta [B, T, HV], g
        B, T, _ = x.shape
        H, HV, Dh = self.cfg.num_heads, self.cfg.num_v_heads, self.cfg.head_dim
        qkv = causal_conv(self.qkv_proj(x), self.conv_weight, sp=sp, cu_seqlens=cu_seqlens, cache=cache)
        q, k, v = F.silu(qkv).split((H * Dh, H * Dh, HV * Dh), dim=-1)
        q, k = (F.normalize(t.view(B, T, H, Dh), dim=-1) for t in (q, k))
        v = v.view(B, T, HV, Dh)
        return q, k, v, torch.sigmoid(self.b_proj(x)), self.decay(x)

    def output(self, o, x):
        # o: [B, T, HV, Dh]; x: [B, T, D] -> [B, T, D]
        o = self.o_norm(o) * self.output_gate(x).view(o.shape)
        return self.o_proj(o.reshape(*x.shape[:2], -1))

    def new_cache(self) -> DeltaState:
        return DeltaState()

    # ------------------------------------------------------------------------------------------ formulas
    @classmethod
    def gate_weights(cls, cfg) -> int:
        return 0

    @classmethod
    def gate_parameters(cls, cfg) -> int:
        return 0

    @classmethod
    def output_gate_weights(cls, cfg) -> int:
        return cfg.hidden_size * cfg.num_v_heads * cfg.head_dim

    @classmethod
    def output_gate_parameters(cls, cfg) -> int:
        return 0

    @classmethod
    def matmul_weights(cls, cfg) -> int:
        # q, k, v, o_proj, the beta projection + the output gate's + the decay's
        D, H, HV, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_v_heads, cfg.head_dim
        return D * (2 * H + 2 * HV) * Dh + D * HV + cls.output_gate_weights(cfg) + cls.gate_weights(cfg)

    @classmethod
    def other_parameters(cls, cfg) -> int:
        # output RMSNorm, beta bias, the short conv on the q, k, v channels + the output gate's + the decay's
        H, HV, Dh = cfg.num_heads, cfg.num_v_heads, cfg.head_dim
        return (Dh + HV * cls.beta_bias + (2 * H + HV) * Dh * cfg.delta_conv_size + cls.output_gate_parameters(cfg)
                + cls.gate_parameters(cfg))

    @classmethod
    def saved_bytes(cls, cfg, backend: str) -> dict:
        """Counted like the decay family's, on the SP path: per token the conv's input and halo rows, silu, L2
        norms, beta, decay, the gated norm 8·D + 66·H·Dh + 30·H + 6; per padded token the UT transform and the
        chunk scan of the augmented state [M | S] (K x (K + V) per chunk); per held segment its [M | S] map and
        entering state. The Triton scan (backend "triton": the custom op `lsp::delta_chunk_scan`) keeps the
        entering states once where autograd of the torch scan also keeps every chunk's state: K·(K + V)·4 / C
        bytes less per padded token and head (measured on hybrid-gdn-1.3b-128k at sp = 8: 0.53 GB less at the
        peak, 2.0 KB per token and head). Counted at HV = H; the op runs on the HV value heads (q, k repeated to
        them), so H below is HV."""
        D, H, Dh, C = cfg.hidden_size, cfg.num_v_heads, cfg.head_dim, CHUNK_SIZE
        scan = 16 if backend == "triton" else 24
        return {"token": 8 * D + 66 * H * Dh + 30 * H + 6, "keys": 0,
                "padded": 52 * H * Dh + 28 * H * C + 16 * H + 4 * H / C + scan * H * Dh * Dh / C,
                "segment": 16 * H * Dh * Dh}

    @classmethod
    def exchange_payload(cls, cfg, rows: int, act_bytes: float) -> dict:
        # A travels inside the maps; the conv halo: one segment's last k - 1 inputs of the q, k, v channels
        halo = rows * (cfg.delta_conv_size - 1) * (2 * cfg.num_heads + cfg.num_v_heads) * cfg.head_dim * act_bytes
        return {"decay_bytes": 0, "halo_bytes": halo}
