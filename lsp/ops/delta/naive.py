"""The trusted reference: the (gated) delta rule written step by step.

    S_0 = initial_state (or 0)
    S_t = (I - beta_t k_t k_tᵀ) Diag(exp g_t) S_{t-1} + beta_t k_t v_tᵀ          # [K, V]
        = S' + beta_t k_t (v_t - S'ᵀ k_t)ᵀ   with S' = Diag(exp g_t) S_{t-1}    (the form computed below)
    o_t = scale * q_t S_t                                                # the current token is included

g_t is one log-decay per head (Gated DeltaNet: Diag(exp g_t) = exp(g_t) I) or one per key channel (Kimi Delta
Attention); the gate acts before the erase. Slow (a Python loop over T) and differentiable by autograd; every
faster path is tested against it.
"""
from __future__ import annotations

import torch

from lsp.ops.linear.checks import acc_dtype, seq_bounds


def delta_step(q, k, v, beta, g, scale, state):
    """One token of the recurrence: S' = Diag(exp g) S, S_t = S' + beta k (v - S'ᵀ k)ᵀ, o = scale · q S_t.

    The only definition of the step: the reference loops over it and a decoding model advances its cache by it.
    """
    # q, k: [B, H, K]; v: [B, H, V]; beta: [B, H]; g: [B, H], [B, H, K] or None; state: [B, H, K, V]
    # (accumulation dtype, the other inputs already in it) -> o [B, H, V], S_t [B, H, K, V]
    if g is not None:
        decay = g.to(state.dtype).exp()
        state = (decay[..., None] if decay.dim() == k.dim() else decay[..., None, None]) * state
    error = v - torch.einsum("bhk,bhkv->bhv", k, state)                       # what the memory gets wrong
    state = state + beta[..., None, None] * k[..., :, None] * error[..., None, :]
    return scale * torch.einsum("bhk,bhkv->bhv", q, state), state


def naive_delta_recurrence(q, k, v, beta, g, scale, initial_state):
    # q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; g: [B, T, H], [B, T, H, K] or None;
    # initial_state: [B, H, K, V] or None
    B, T, H, K = q.shape
    dt = acc_dtype(q.dtype)
    q, k, v, beta = q.to(dt), k.to(dt), v.to(dt), beta.to(dt)
    state = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(T):
        o_t, state = delta_step(q[:, t], k[:, t], v[:, t], beta[:, t], None if g is None else g[:, t], scale, state)
        outs.append(o_t)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, v.shape[-1])
    return o, state


def naive_delta_rule(q, k, v, beta, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Step-by-step reference; arguments as `lsp.ops.delta_rule` (already validated)."""
    return per_sequence(naive_delta_recurrence, (q, k, v, beta, g), scale, initial_state, output_final_state,
                        cu_seqlens)


def per_sequence(recurrence, inputs, scale, initial_state, output_final_state, cu_seqlens):
    """Run `recurrence(*inputs, scale, init) -> (o, state)` on every packed sequence (or on the whole batch) and
    join the outputs; inputs: [B, T, ...] tensors or None, the first of them q. Returns (o, final states or None)."""
    q = inputs[0]
    bounds = seq_bounds(cu_seqlens, q.shape[0], q.shape[1]) or [(0, q.shape[1])]
    part = lambda x, s, e: None if x is None else x[:, s:e]  # noqa: E731
    outs, states = [], []
    for n, (s, e) in enumerate(bounds):
        init = initial_state if cu_seqlens is None or initial_state is None else initial_state[n : n + 1]
        o, state = recurrence(*(part(x, s, e) for x in inputs), scale, init)
        outs.append(o)
        states.append(state)
    o = torch.cat(outs, dim=1).to(q.dtype)
    return o, (torch.cat(states, dim=0) if output_final_state else None)
