"""Decoding state of `HybridLM`: one cache object per layer, so the model continues a sequence token by token.

Contract of a per-layer cache (what a new layer kind implements to plug into `HybridLM.generate`):

* the attention module has `new_cache()` returning an empty cache object of its own type;
* `attn(x, positions, cache=c)` treats `x: [B, T, D]` as the T tokens that follow every token `c` has already
  consumed, returns their outputs `[B, T, D]` exactly as the full forward would at those positions, and updates
  `c` in place so that the next call continues after them (T = prompt length at prefill, 1 per generated token);
* `positions` are the global positions of x's tokens (`DecodeCache.seen` + 0..T-1), used by layers with RoPE.

Three kinds here: `RecurrentState` for linear attention (the d_k x d_v state per head, O(1) per token), `KVCache`
for softmax attention and `DeltaState` for a delta-rule layer (its d_k x d_v state per head plus the last
`kernel_size - 1` inputs of its short convolution on q, k, v, also O(1) per token). Every layer calls
`check_decoding(sp, cu_seqlens)` first. Below them, `recurrent_step`: one token of the linear recurrence, what a
RecurrentState advances by; a DeltaState advances by `lsp.ops.delta.naive.delta_step` (`delta_recurrent_step`) or,
for the DPLR rule (RWKV-7), `lsp.ops.dplr.naive.dplr_step` (`dplr_recurrent_step`), and its convolution (RWKV-7's
token shift is one: kernel 2) by `continue_conv`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from lsp.ops.delta import repeat_heads, short_conv
from lsp.ops.delta.naive import delta_step
from lsp.ops.dplr.naive import dplr_step


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
class DeltaState:
    """Delta-rule layer: the state after the consumed tokens [B, HV, K, V] (accumulation dtype) and the last
    kernel_size - 1 inputs of the short convolution, conv_tail [B, kernel_size - 1, (2 H + HV) Dh] (None: nothing
    yet)."""
    state: Optional[torch.Tensor] = None
    conv_tail: Optional[torch.Tensor] = None


@dataclass
class DecodeCache:
    """The caches of every layer plus `seen`, the number of tokens consumed so far (the next token's position)."""
    layers: List[object] = field(default_factory=list)
    seen: int = 0


def check_decoding(sp, cu_seqlens) -> None:
    if sp is not None or cu_seqlens is not None:
        raise ValueError("cache (decoding) runs in one process on one unpacked sequence per row: pass sp=None "
                         "and cu_seqlens=None")


def recurrent_step(q, k, v, g, scale, state):
    """One token of the linear-attention recurrence: S' = diag(exp g) S + kᵀ v, o = scale · q S'.

    q, k: [B, 1, H, K]; v: [B, 1, H, V]; g: None | [H] | [B, 1, H] | [B, 1, H, K]; state: [B, H, K, V] or None
    (zeros). Returns o [B, 1, H, V] in q's dtype and S' in the accumulation dtype (fp64 for fp64, else fp32).
    """
    B, _, H, K = q.shape
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q1, k1, v1 = q[:, 0].to(dt), k[:, 0].to(dt), v[:, 0].to(dt)            # [B, H, K], [B, H, V]
    S = q1.new_zeros(B, H, K, v.shape[-1]) if state is None else state.to(dt)
    if g is not None:
        decay = g.to(dt).exp()
        decay = decay[None, :, None] if decay.dim() == 1 else decay[:, 0].reshape(B, H, -1)   # [B | 1, H, K | 1]
        S = decay[..., None] * S
    S = S + k1[..., :, None] * v1[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q1, S)
    return o[:, None].to(q.dtype), S


def delta_recurrent_step(q, k, v, beta, g, scale, state):
    """One token of the (gated) delta rule (`delta_step`, the reference's own step) in decoding shapes.

    q, k: [B, 1, H, K]; v: [B, 1, HV, V] (HV = G·H, value head j reads q/k head j // G); beta: [B, 1, HV];
    g: None | [B, 1, HV] | [B, 1, HV, K]; state: [B, HV, K, V] or None (zeros).
    Returns o [B, 1, HV, V] in q's dtype and S' in the accumulation dtype (fp64 for fp64, else fp32).
    """
    B, _, HV, V = v.shape
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = (repeat_heads(t, HV // q.shape[2]) for t in (q, k))
    S = q.new_zeros(B, HV, q.shape[-1], V, dtype=dt) if state is None else state.to(dt)
    o, S = delta_step(*(x[:, 0].to(dt) for x in (q, k, v, beta)), None if g is None else g[:, 0], scale, S)
    return o[:, None].to(q.dtype), S


def dplr_recurrent_step(q, k, v, a, b, g, scale, state):
    """One token of the DPLR delta rule (`dplr_step`, the reference's own step) in decoding shapes.

    q, k, a, b, g: [B, 1, H, K]; v: [B, 1, H, V]; state: [B, H, K, V] or None (zeros).
    Returns o [B, 1, H, V] in q's dtype and S' in the accumulation dtype (fp64 for fp64, else fp32).
    """
    B, _, H, K = q.shape
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=dt) if state is None else state.to(dt)
    o, S = dplr_step(*(x[:, 0].to(dt) for x in (q, k, v, a, b, g)), scale, S)
    return o[:, None].to(q.dtype), S


def continue_conv(x, weight, tail):
    """The short causal convolution of T new inputs that follow the consumed ones, whose last k - 1 are `tail`.

    x: [B, T, D]; weight: [D, k]; tail: [B, k - 1, D] or None (nothing consumed: zeros, as before a document start).
    Returns y [B, T, D] (what `short_conv` gives at these positions of the whole sequence) and the new tail, the
    last k - 1 inputs of [tail, x] (it still reaches back before x when T < k - 1).
    """
    B, T, D = x.shape
    k = weight.shape[-1]
    halo = x.new_zeros(B, k - 1, D) if tail is None else tail
    one_document = torch.zeros(1, k - 1 + T, dtype=torch.long, device=x.device)
    y = short_conv(x, weight, halo=halo, seq_ids=one_document)
    return y, torch.cat([halo, x], dim=1)[:, T:]
