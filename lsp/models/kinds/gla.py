"""`gla`: Gated Linear Attention, a log-decay per key dimension from a low-rank projection,
g[b, t, h, :] = logsigmoid(W2 W1 x_t + b) / gate_logit_normalizer. A segment's map is a diagonal per head."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..linear_kind import accumulation_dtype, register_kind
from ._decay import DecayKind


@register_kind
class GLA(DecayKind):
    name = "gla"
    state_map = "diagonal"

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.decay_down = nn.Linear(cfg.hidden_size, cfg.gate_low_rank_dim, bias=False)
        self.decay_up = nn.Linear(cfg.gate_low_rank_dim, cfg.num_heads * cfg.head_dim, bias=True)

    def decay(self, x):
        # x: [B, T, D] -> [B, T, H, Dh]
        logits = self.decay_up(self.decay_down(x)).to(accumulation_dtype(x))
        return (F.logsigmoid(logits) / self.cfg.gate_logit_normalizer).view(*x.shape[:2], self.cfg.num_heads, -1)

    @classmethod
    def gate_dims(cls, cfg) -> int:
        return cfg.head_dim

    @classmethod
    def gate_weights(cls, cfg) -> int:
        return (cfg.hidden_size + cfg.num_heads * cfg.head_dim) * cfg.gate_low_rank_dim

    @classmethod
    def gate_parameters(cls, cfg) -> int:
        return cfg.num_heads * cfg.head_dim
