"""`hgrn2`: HGRN2 (Qin et al. 2024, "Gated Linear RNNs with State Expansion") on the GLA (per-key decay) op.
Per head of K = V = head_dim channels, layer l of L:

    q     = silu(q_proj(x)),   v = i_proj(x)
    f     = lb_l + (1 - lb_l) · sigmoid(f_proj(x))      forget gate in [lb_l, 1), lb_l = l / L (`forget_lower_bound`)
    g     = log f  [B, T, H, K],   k = 1 - f            the input gate is tied to the forget gate
    S_t   = Diag(f_t) S_{t-1} + k_t v_tᵀ,   o_t = K^-1/2 · q_t S_t
    out   = o_proj(RMSNorm(o))                          one norm over all H·K channels, no output gate

The lower bound rises with depth so that deep layers keep long memory; layer 0 has none. A segment's map is a
diagonal per head: SP exchanges states and total decays, as GLA. Decoding keeps the state (`RecurrentState`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lsp.names import CHUNK_SIZE

from ..cache import RecurrentState
from ..layers import RMSNorm
from ..linear_kind import LinearKind, accumulation_dtype, register_kind
from ._decay import DecayKind


def forget_lower_bound(layer_idx: int, num_layers: int) -> float:
    """HGRN2's lower bound of layer layer_idx's forget gates: l / L, the value fla's model-level bounds
    (softmax over layers, cumulative sum, minus the first) take at their initialisation."""
    return layer_idx / num_layers


@register_kind
class HGRN2(LinearKind):
    name = "hgrn2"
    state_map = "diagonal"
    recurrence = DecayKind.recurrence          # the GLA op (its projections and output path are HGRN2's own)

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        D, width = cfg.hidden_size, cfg.num_heads * cfg.head_dim
        self.q_proj = nn.Linear(D, width, bias=False)
        self.f_proj = nn.Linear(D, width, bias=False)
        self.i_proj = nn.Linear(D, width, bias=False)
        self.g_norm = RMSNorm(width, cfg.norm_eps)
        self.o_proj = nn.Linear(width, D, bias=False)
        self.lower_bound = forget_lower_bound(layer_idx, cfg.num_layers)

    def forget_log(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, D] -> log f [B, T, H, K] <= log(1) in the accumulation dtype
        logits = self.f_proj(x).to(accumulation_dtype(x)).view(*x.shape[:2], self.cfg.num_heads, -1)
        g = F.logsigmoid(logits)
        if self.lower_bound == 0:
            return g
        lb = torch.tensor(self.lower_bound, dtype=g.dtype)
        return torch.logaddexp(lb.log(), torch.log1p(-lb) + g)      # log(lb + (1 - lb) sigmoid)

    def op_inputs(self, x, *, sp=None, cu_seqlens=None, cache=None) -> tuple:
        # x: [B, T, D] -> q, k, v [B, T, H, K], g [B, T, H, K]
        shape = (*x.shape[:2], self.cfg.num_heads, self.cfg.head_dim)
        g = self.forget_log(x)
        q = F.silu(self.q_proj(x)).view(shape)
        return q, (-torch.expm1(g)).to(q.dtype), self.i_proj(x).view(shape), g     # q's: bf16 under autocast

    def output(self, o, x):
        # o: [B, T, H, K]; x: [B, T, D] -> [B, T, D]
        return self.o_proj(self.g_norm(o.reshape(*x.shape[:2], -1)))

    def new_cache(self) -> RecurrentState:
        return RecurrentState()

    # ------------------------------------------------------------------------------------------ formulas
    @classmethod
    def matmul_weights(cls, cfg) -> int:
        # q, f, i projections and o_proj
        return 4 * cfg.hidden_size * cfg.num_heads * cfg.head_dim

    @classmethod
    def other_parameters(cls, cfg) -> int:
        return cfg.num_heads * cfg.head_dim                  # the output RMSNorm over all channels

    @classmethod
    def saved_bytes(cls, cfg, backend: str) -> dict:
        """Estimated from the GLA family's hook-counted terms (`DecayKind.saved_bytes`, gate_low_rank_dim 0):
        HGRN2 has no output gate (-4·H·Dh per token) and derives k from its fp32 forget logits (+4·H·Dh). Checked
        through the peak it feeds: `lsp plan --measure` on configs/tiny-hgrn2-cpu.yaml models 1.002 of the measured
        peak (tests/plan/test_measure.py, within 15%)."""
        D, H, Dh, C = cfg.hidden_size, cfg.num_heads, cfg.head_dim, CHUNK_SIZE
        own = 10 * D + 24 * H * Dh + 4 * H
        if backend == "triton":
            return {"token": own + 6 * H * Dh + 4 * H * Dh, "padded": 0, "segment": 4 * H * Dh * Dh, "keys": 0}
        return {"token": own, "keys": 0,
                "padded": 50 * H * Dh + 4 * H * C + 4 * H * Dh / C + 8 * H * Dh * Dh / C,
                "segment": 4 * H * Dh * Dh, "incoming": 6 * H * Dh}

    @classmethod
    def exchange_payload(cls, cfg, rows: int, act_bytes: float) -> dict:
        # the total decay of a segment: head_dim values per head (fp32); no short convolution
        return {"decay_bytes": rows * cfg.num_heads * cfg.head_dim * 4, "halo_bytes": 0}
