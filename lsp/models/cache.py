"""Decoding state of `HybridLM`: one cache object per layer, so the model continues a sequence token by token.

Contract of a per-layer cache (what a new layer kind implements to plug into `HybridLM.generate`):

* the attention module has `new_cache()` returning an empty cache object of its own type;
* `attn(x, positions, cache=c)` treats `x: [B, T, D]` as the T tokens that follow every token `c` has already
  consumed, returns their outputs `[B, T, D]` exactly as the full forward would at those positions, and updates
  `c` in place so that the next call continues after them (T = prompt length at prefill, 1 per generated token);
* `positions` are the global positions of x's tokens (`DecodeCache.seen` + 0..T-1), used by layers with RoPE.

Two kinds here: `RecurrentState` for linear attention (the d_k x d_v state per head, O(1) per token) and `KVCache`
for softmax attention. A delta-rule layer keeps its state plus the last `kernel_size - 1` inputs of its short
convolution in a cache of its own with the same contract.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class RecurrentState:
    """Linear attention: the state after the consumed tokens, [B, H, K, V] in the accumulation dtype."""
    state: Optional[torch.Tensor] = None


@dataclass
class KVCache:
    """Softmax attention: keys (after RoPE) and values of the consumed tokens, [B, T_seen, Hkv, D] each."""
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [B, T, Hkv, D] -> all keys / values so far [B, T_seen + T, Hkv, D]
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        return self.k, self.v


@dataclass
class DecodeCache:
    """The caches of every layer plus `seen`, the number of tokens consumed so far (the next token's position)."""
    layers: List[object] = field(default_factory=list)
    seen: int = 0
