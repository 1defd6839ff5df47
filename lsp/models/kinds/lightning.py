"""`lightning`: Lightning Attention / TransNormerLLM. q, k = silu(proj); a fixed log-decay per head,
g[h] = -lightning_slopes(h) (a buffer derived from the config, not saved). A segment's map is a scalar per head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..linear_kind import accumulation_dtype, register_kind
from ._decay import DecayKind


def lightning_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Fixed per-head decay rates of Lightning Attention / TransNormerLLM: ALiBi slopes 2^(-8h/H), h = 1..H,
    scaled by (1 - l / (L - 1) + 1e-5) so that deeper layers decay more slowly. Returns [H] rates > 0; log-decay
    is g = -rate."""
    # ALiBi's closed form for a power-of-two head count, interleaved as in the ALiBi paper otherwise.
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_2(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: num_heads - closest]
    depth = 1 - layer_idx / (num_layers - 1) + 1e-5 if num_layers > 1 else 1.0
    return torch.tensor(slopes, dtype=torch.float64) * depth


def lightning_log_decay(cfg, layer_idx: int) -> torch.Tensor:
    """Lightning's fixed log-decay of layer layer_idx, [H] fp32."""
    return -lightning_slopes(cfg.num_heads, layer_idx, cfg.num_layers).float()


@register_kind
class Lightning(DecayKind):
    name = "lightning"
    state_map = "scalar"

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.register_buffer("log_decay", lightning_log_decay(cfg, layer_idx), persistent=False)

    def reset_buffers(self) -> None:
        self.log_decay = lightning_log_decay(self.cfg, self.layer_idx).to(self.log_decay.device)

    def features(self, q, k):
        # q, k: [B, T, H, K] -> silu(q), silu(k)
        return F.silu(q), F.silu(k)

    def decay(self, x):
        # x: [B, T, D] -> [H]
        return self.log_decay.to(accumulation_dtype(x))
