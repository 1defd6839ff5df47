"""Building blocks of `HybridLM`: RMSNorm, RoPE, SwiGLU and softmax attention (the linear kinds: `linear_kind.py`).

Every attention layer takes `x: [B, T, D]` plus the global token positions of its rows and, when `sp` is given,
runs sequence-parallel on the local shard (the same sharding for every kind, so the model shards once). With
`cache` (one process, no packing) it continues a sequence from its decoding state instead: see `cache.py`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lsp.ops import softmax_attention
from lsp.ops.softmax import causal_suffix_attention

from .cache import KVCache, check_decoding
from .config import HybridConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) * weight, computed in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]
        xf = x if x.dtype == torch.float64 else x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (Llama / GPT-NeoX half-split convention) at the given token positions.

    x: [B, T, H, D]; positions: [B, T] long (global positions). Pair (x_i, x_{i+D/2}) is rotated by the angle
    p · theta^(-2i/D). Angles in fp32 (fp64 for fp64 x), so large positions keep their precision.
    """
    D = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=dtype) / D)
    angles = positions.to(dtype)[..., None] * inv_freq                          # [B, T, D/2]
    emb = torch.cat((angles, angles), dim=-1)[:, :, None, :]                    # [B, T, 1, D]
    xf = x.to(dtype)
    return (xf * emb.cos() + rotate_half(xf) * emb.sin()).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, D]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention with GQA and RoPE at global positions."""

    shared_values = ()   # reads or writes no cross-layer value (`LinearKind.shared_values`)

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        H, Hkv, Dh, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)

    def new_cache(self) -> KVCache:
        return KVCache()

    def forward(self, x, positions, sp=None, cu_seqlens=None, cache=None):
        # x: [B, T, D]; positions: [B, T] long -> [B, T, D]
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(B, T, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
        if cache is not None:
            check_decoding(sp, cu_seqlens)
            # the new queries are the last T of all positions so far: bottom-right causal over the cached keys
            o = causal_suffix_attention(q, *cache.append(k, v))
        elif sp is None:
            o = softmax_attention(q, k, v, causal=True, cu_seqlens=cu_seqlens)
        else:
            from lsp.parallel import sp_softmax_attention
            o = sp_softmax_attention(q, k, v, sp=sp, causal=True, cu_seqlens=cu_seqlens)
        return self.o_proj(o.reshape(B, T, -1))
