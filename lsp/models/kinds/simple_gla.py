"""`simple_gla`: a data-dependent scalar log-decay per head, g[b, t, h] = logsigmoid(w_h · x_t + b_h) /
gate_logit_normalizer (Mamba-2 style gate). A segment's map is a scalar per head."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..linear_kind import accumulation_dtype, register_kind
from ._decay import DecayKind


@register_kind
class SimpleGLA(DecayKind):
    name = "simple_gla"
    state_map = "scalar"

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.decay_proj = nn.Linear(cfg.hidden_size, cfg.num_heads, bias=True)

    def decay(self, x):
        # x: [B, T, D] -> [B, T, H]
        return F.logsigmoid(self.decay_proj(x).to(accumulation_dtype(x))) / self.cfg.gate_logit_normalizer

    @classmethod
    def gate_dims(cls, cfg) -> int:
        return 1

    @classmethod
    def gate_weights(cls, cfg) -> int:
        return cfg.hidden_size * cfg.num_heads

    @classmethod
    def gate_parameters(cls, cfg) -> int:
        return cfg.num_heads
