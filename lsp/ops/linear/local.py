"""The local pass every sequence-parallel method reuses (no communication here).

A rank (or a sequence segment) computes, with no remote data:

* `segment_state`: its own final state S_loc from a zero entering state (cheap: chunk summaries + scan), the one
  thing other ranks need. Computed first so its exchange can start before the expensive part.
* `linear_attention(..., initial_state=None)`: its output from a zero entering state (the intra-chunk work).
* `cum_log_decay`: the cumulative log-decay from the segment start, cum_g_t = Σ_{s<=t} g_s.

When the entering state S_in arrives the exact result is the zero-state result plus a cheap correction, by
linearity of the recurrence in S:

    o_t     += scale · (q_t ⊙ exp(cum_g_t)) S_in
    S_final += exp(cum_g_T) ⊙ S_in
"""
from __future__ import annotations

import torch

from .api import resolve_backend
from .checks import acc_dtype, broadcast_decay, check_linear_inputs
from .chunk import chunk_final_state


def segment_state(k, v, g=None, *, initial_state=None, cu_seqlens=None):
    """Final state(s) of a segment: [B, H, K, V] ([N, H, K, V] with cu_seqlens), accumulation dtype.

    k: [B, T, H, K]; v: [B, T, H, V]; g: None, [H], [B, T, H] or [B, T, H, K]. Differentiable.
    """
    form = check_linear_inputs(k, k, v, g, initial_state, cu_seqlens)
    return chunk_final_state(k, v, broadcast_decay(g, form), initial_state, cu_seqlens)


def cum_log_decay(g, B: int, T: int, H: int, dtype=torch.float32):
    """Cumulative log-decay from the segment start, [B, T, H, 1 or K] (None when g is None). Differentiable."""
    if g is None:
        return None
    if g.dim() == 1:
        g = g.view(1, 1, H, 1)
    elif g.dim() == 3:
        g = g.unsqueeze(-1)
    return g.to(dtype).expand(B, T, H, g.shape[-1]).cumsum(dim=1)


def add_incoming_state(o, q, cum_g, state_in, scale):
    """o + scale · (q ⊙ exp(cum_g)) S_in, in o's dtype.

    o: [B, T, H, V]; q: [B, T, H, K]; cum_g: [B, T, H, 1 or K] or None; state_in: [B, H, K, V].
    """
    dt = acc_dtype(q.dtype)
    q_decayed = q.to(dt) if cum_g is None else q.to(dt) * cum_g.to(dt).exp()
    return o + (scale * torch.einsum("bthk,bhkv->bthv", q_decayed, state_in.to(dt))).to(o.dtype)


def carry_state(state_local, total_log_decay, state_in):
    """State after a segment given the state entering it: exp(a) ⊙ S_in + S_loc.

    state_local, state_in: [B, H, K, V]; total_log_decay: [B, H, 1 or K] (cum_g at the last token) or None.
    """
    if total_log_decay is None:
        return state_local + state_in
    return total_log_decay.exp()[..., None] * state_in + state_local


__all__ = ["segment_state", "cum_log_decay", "add_incoming_state", "carry_state", "resolve_backend"]
