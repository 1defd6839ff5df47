"""`gated_deltanet`: Gated DeltaNet, the delta rule with a Mamba-2 style scalar decay per head,
g = -exp(A_log) · softplus(a_proj(x) + dt_bias)  [B, T, HV] (one per value head)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..linear_kind import accumulation_dtype, register_kind
from ._delta import DeltaKind


@register_kind
class GatedDeltaNet(DeltaKind):
    name = "gated_deltanet"

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        H = cfg.num_v_heads
        self.a_proj = nn.Linear(cfg.hidden_size, H, bias=False)
        # decay rates A ~ U(0, 16) and time steps dt ~ log-uniform [1e-3, 0.1] (dt_bias = softplus^-1(dt))
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1e-4, 16).log())
        dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))

    def decay(self, x):
        # x: [B, T, D] -> [B, T, HV] log-decay <= 0
        dtype = accumulation_dtype(x)
        return -self.A_log.to(dtype).exp() * F.softplus(self.a_proj(x).to(dtype) + self.dt_bias.to(dtype))

    @classmethod
    def gate_weights(cls, cfg) -> int:
        return cfg.hidden_size * cfg.num_v_heads

    @classmethod
    def gate_parameters(cls, cfg) -> int:
        return 2 * cfg.num_v_heads          # A_log, dt_bias
