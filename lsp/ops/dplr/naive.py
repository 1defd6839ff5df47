"""The trusted reference: the diagonal-plus-low-rank (DPLR) delta rule of RWKV-7, written step by step.

    S_0 = initial_state (or 0)
    S_t = Diag(exp g_t) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ       # [K, V]; a reads the state BEFORE the decay
    o_t = scale · q_tᵀ S_t                                             # the current token is included

RWKV-7 takes a = -κ̂ and b = κ̂ ⊙ α (a removal along the unit key κ̂, refilled with strength α); any a, b are allowed.
Slow (a Python loop over T) and differentiable by autograd; every faster path is tested against it.
"""
from __future__ import annotations

import torch

from lsp.ops.delta.naive import per_sequence
from lsp.ops.linear.checks import acc_dtype


def dplr_step(q, k, v, a, b, g, scale, state):
    """One token: S_t = exp(g) ⊙ S + b (aᵀ S) + k vᵀ, o = scale · qᵀ S_t. The only definition of the step.

    q, k, a, b, g: [B, H, K]; v: [B, H, V]; state: [B, H, K, V] (accumulation dtype, the inputs already in it).
    Returns o [B, H, V], S_t [B, H, K, V].
    """
    read = torch.einsum("bhk,bhkv->bhv", a, state)                        # a_tᵀ S_{t-1}, before the decay
    state = g.exp()[..., None] * state + b[..., :, None] * read[..., None, :] + k[..., :, None] * v[..., None, :]
    return scale * torch.einsum("bhk,bhkv->bhv", q, state), state


def naive_dplr_recurrence(q, k, v, a, b, g, scale, initial_state):
    # q, k, a, b, g: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V] or None -> o [B, T, H, V], S_T
    B, T, H, K = q.shape
    dt = acc_dtype(q.dtype)
    q, k, v, a, b, g = (x.to(dt) for x in (q, k, v, a, b, g))
    state = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(T):
        o_t, state = dplr_step(q[:, t], k[:, t], v[:, t], a[:, t], b[:, t], g[:, t], scale, state)
        outs.append(o_t)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, v.shape[-1])
    return o, state


def naive_dplr_delta_rule(q, k, v, a, b, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Step-by-step reference; arguments as `lsp.ops.dplr_delta_rule` (already validated)."""
    return per_sequence(naive_dplr_recurrence, (q, k, v, a, b, g), scale, initial_state, output_final_state,
                        cu_seqlens)
