"""The trusted reference: the recurrence written step by step.

    S_0 = initial_state (or 0)
    S_t = exp(g_t)[:, None] * S_{t-1} + k_tᵀ v_t          # [K, V]
    o_t = scale * q_t S_t                                 # the current token is included

Slow (a Python loop over T) and differentiable by autograd; every faster path is tested against it.
"""
from __future__ import annotations

import torch

from .checks import acc_dtype, seq_bounds


def naive_recurrence(q, k, v, g, scale, initial_state):
    # q, k: [B, T, H, K]; v: [B, T, H, V]; g: broadcastable to [B, T, H, K] or None; initial_state: [B, H, K, V] or None
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = acc_dtype(q.dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    if g is not None:
        decay = torch.exp(g.to(dt)).expand(B, T, H, -1)
    outs = []
    for t in range(T):
        if g is not None:
            state = decay[:, t, :, :, None] * state
        state = state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, V)
    return o, state


def naive_linear_attention(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Step-by-step reference; arguments as `lsp.ops.linear_attention` with g already broadcastable."""
    bounds = seq_bounds(cu_seqlens, q.shape[0], q.shape[1])
    if bounds is None:
        o, state = naive_recurrence(q, k, v, g, scale, initial_state)
        return o.to(q.dtype), (state if output_final_state else None)
    outs, states = [], []
    for n, (s, e) in enumerate(bounds):
        g_n = None if g is None else (g[:, s:e] if g.shape[1] != 1 else g)
        init = None if initial_state is None else initial_state[n : n + 1]
        o, state = naive_recurrence(q[:, s:e], k[:, s:e], v[:, s:e], g_n, scale, init)
        outs.append(o)
        states.append(state)
    o = torch.cat(outs, dim=1).to(q.dtype)
    return o, (torch.cat(states, dim=0) if output_final_state else None)
