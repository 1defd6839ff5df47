"""The local pass every sequence-parallel method reuses (no communication here).

A rank (or a sequence segment) computes with no remote data, in the backend that runs the op (`torch` or
`triton`), in two phases so that the exchange can start between them:

* `local_states` (phase 1): the state entering every chunk, h, and the segment's own final state S_loc from a
  zero (or initial) entering state: the one thing other ranks need.
* `local_output` (phase 2): the output from that entering state, o0, from h (the intra-chunk work, which overlaps
  the exchange of S_loc). Nothing is computed twice: phase 2 reuses phase 1's padded inputs and chunk states.

When the state S_in entering the segment arrives, the exact result is the zero-state result plus a correction,
by linearity of the recurrence in S (cum_g_t = Σ_{s<=t} g_s from the segment start):

    o_t     = o0_t + scale · (q_t ⊙ exp(cum_g_t)) S_in           `add_incoming_state` (rounded once)
    S_final = S_loc + exp(cum_g_T) ⊙ S_in

The numerics never depend on an enclosing autocast: `exact_numerics` switches it off for the state math, and the
inputs' dtype decides the rest (fp32 accumulation, fp64 for fp64 inputs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..probe import kernel_case
from .api import resolve_backend
from .checks import acc_dtype, broadcast_decay, check_linear_inputs, exact_numerics
from .chunk import chunk_output, chunk_prepare, chunk_states


@dataclass
class LocalPass:
    """Phase 1's result that phase 2 reuses: the backend, its prepared inputs and the chunk-entering states h."""

    backend: str               # "torch" | "triton"
    prep: object               # torch: ChunkInputs (padded k, v, G); triton: (k, v, g4, cu_seqlens, initial_state)
    h: torch.Tensor            # [R, H, NC, K, V] state entering every chunk


def local_states(k, v, g=None, *, initial_state=None, cu_seqlens=None, backend="auto"):
    """Phase 1 -> (LocalPass, final state(s) [B or N, H, K, V] in the accumulation dtype). Differentiable.

    k: [B, T, H, K]; v: [B, T, H, V]; g: None, [H], [B, T, H] or [B, T, H, K]; backend "auto" | "torch" | "triton".
    """
    form = check_linear_inputs(k, k, v, g, initial_state, cu_seqlens)
    g4 = broadcast_decay(g, form)
    name = resolve_backend(backend, k.device, kernel_case("linear_attention", k, v, g))
    if name == "naive" or k.dtype == torch.float64:
        name = "torch"  # the local pass is chunked; fp64 runs in torch in every backend
    with exact_numerics(k):
        if name == "triton":
            from .triton_chunk import triton_chunk_states

            # h is rebuilt in backward (one scan) rather than kept: the pieces keep what the op keeps
            h, final = triton_chunk_states(k, v, g4, initial_state, cu_seqlens, recompute_h=True)
            return LocalPass(name, (k, v, g4, cu_seqlens, initial_state), h), final
        prep = chunk_prepare(k, v, g4, cu_seqlens)
        h, final = chunk_states(prep, initial_state)
        return LocalPass(name, prep, h), final


def local_output(q, lp: LocalPass, scale: float, out_dtype=None):
    """Phase 2: o0 [B, T, H, V] from the chunk-entering states of `lp`, in out_dtype (default q's dtype)."""
    with exact_numerics(q):
        if lp.backend == "triton":
            from .triton_chunk import triton_chunk_output

            k, v, g4, cu_seqlens, initial_state = lp.prep
            return triton_chunk_output(q, k, v, g4, lp.h, scale, cu_seqlens, out_dtype=out_dtype,
                                       recompute_from=(initial_state,))
        return chunk_output(q, lp.prep, lp.h, scale, out_dtype)


def segment_state(k, v, g=None, *, initial_state=None, cu_seqlens=None, backend="auto"):
    """Final state(s) of a segment, [B, H, K, V] ([N, H, K, V] with cu_seqlens), accumulation dtype."""
    return local_states(k, v, g, initial_state=initial_state, cu_seqlens=cu_seqlens, backend=backend)[1]


def cum_log_decay(g, B: int, T: int, H: int, dtype=torch.float32):
    """Cumulative log-decay from the segment start, [B, T, H, 1 or K] (None when g is None). Differentiable."""
    if g is None:
        return None
    if g.dim() == 1:
        g = g.view(1, 1, H, 1)
    elif g.dim() == 3:
        g = g.unsqueeze(-1)
    return cumsum_tokens(g.to(dtype).expand(B, T, H, g.shape[-1]))


def cumsum_tokens(x, block: int = 64):
    """cumsum over dim 1 in two levels (within blocks of 64 tokens, then the block totals): the same sums, about
    twice as fast on CPU as one long scan over a non-innermost axis. x: [B, T, ...]. Differentiable."""
    B, T = x.shape[:2]
    if T <= block or T % block:
        return x.cumsum(dim=1)
    inner = x.reshape(B, T // block, block, *x.shape[2:]).cumsum(dim=2)
    carry = inner[:, :-1, -1:].cumsum(dim=1)
    return torch.cat([inner[:, :1], inner[:, 1:] + carry], dim=1).reshape(x.shape)


def total_log_decay(g, B: int, T: int, H: int, dtype=torch.float32):
    """Σ_t g_t over the segment, [B, H, 1 or K] (None when g is None): cum_log_decay at the last token."""
    if g is None:
        return None
    if g.dim() == 1:
        return (T * g.to(dtype)).view(1, H, 1).expand(B, H, 1)
    s = g.to(dtype).sum(dim=1)
    return s.unsqueeze(-1) if g.dim() == 3 else s


def _incoming_weights(q, g, limit, dt):
    # q: [B, T, H, K] -> w = exp(cum_g) [B, T, H, 1 or K] in dt, zero from `limit` on ([B] first token that sees no
    # S_in); None when there is neither decay nor limit (w = 1)
    B, T, H, _ = q.shape
    cum = cum_log_decay(g, B, T, H, dt)
    w = None if cum is None else cum.exp()
    if limit is not None:
        keep = (torch.arange(T, device=q.device)[None, :] < limit[:, None])[:, :, None, None].to(dt)
        w = keep if w is None else w * keep
    return w


def _weighted(x, w, dt):
    return x.to(dt) if w is None else x.to(dt) * w


def _decay_grad_from_cum(dcum, g, T: int):
    # dcum: ∂L/∂cum_g [B, T, H, Kg] -> ∂L/∂g in g's shape (cum_g_t = Σ_{s<=t} g_s; for g [H], cum_g_t = (t+1)·g)
    if g.dim() == 1:
        steps = torch.arange(1, T + 1, dtype=dcum.dtype, device=dcum.device).view(1, T, 1, 1)
        return (dcum * steps).sum(dim=(0, 1, 3)).to(g.dtype)
    rev = cumsum_tokens(dcum.flip(1)).flip(1)
    return (rev[..., 0] if g.dim() == 3 else rev).to(g.dtype)


class _IncomingState(torch.autograd.Function):
    """o = o0 + scale · (q ⊙ exp(cum_g)) S_in, cast once. Saves q, g, S_in (not q ⊙ exp(cum_g), which is
    recomputed in backward), so the correction keeps nothing the size of the sequence beyond what the op keeps.
    Backward: with w = exp(cum_g) and dqd = scale · dO S_inᵀ, dq = w ⊙ dqd, ∂L/∂cum_g = q ⊙ w ⊙ dqd (summed
    to g's width), dg = its reverse cumulative sum, dS_in = scale · (q ⊙ w)ᵀ dO."""

    @staticmethod
    def forward(ctx, o0, q, g, state_in, scale, limit, out_dtype):
        dt = o0.dtype
        qd = _weighted(q, _incoming_weights(q, g, limit, dt), dt)
        ctx.save_for_backward(q, g, state_in, limit)
        ctx.scale, ctx.o0_dtype = scale, o0.dtype
        return (o0 + scale * torch.einsum("bthk,bhkv->bthv", qd, state_in.to(dt))).to(out_dtype)

    @staticmethod
    def backward(ctx, do):
        q, g, state_in, limit = ctx.saved_tensors
        dt = ctx.o0_dtype
        do = do.to(dt)
        dqd = ctx.scale * torch.einsum("bthv,bhkv->bthk", do, state_in.to(dt))
        w = _incoming_weights(q, g, limit, dt)   # exp(cum_g), zero past `limit` (recomputed, not saved)
        qd = _weighted(q, w, dt)
        dq = _weighted(dqd, w, dt).to(q.dtype) if ctx.needs_input_grad[1] else None
        dg = None
        if g is not None and ctx.needs_input_grad[2]:
            dcum = qd * dqd
            dcum = dcum if g.dim() == 4 else dcum.sum(-1, keepdim=True)
            dg = _decay_grad_from_cum(dcum, g, q.shape[1])
        dS = ctx.scale * torch.einsum("bthk,bthv->bhkv", qd, do) if ctx.needs_input_grad[3] else None
        return do, dq, dg, (None if dS is None else dS.to(state_in.dtype)), None, None, None


def add_incoming_state(o0, q, g, state_in, scale, *, limit=None, out_dtype=None):
    """o0 + scale · (q ⊙ exp(cum_g)) S_in in the accumulation dtype, rounded once to out_dtype (default q's).

    o0: [B, T, H, V] (the zero-state output, best in the accumulation dtype); q: [B, T, H, K]; g: None, [H],
    [B, T, H] or [B, T, H, K] (this segment's log-decay); state_in: [B, H, K, V]; limit: None or LongTensor [B],
    the first position of each row that the incoming state does not reach (a document starts there).
    """
    with exact_numerics(q):
        return _IncomingState.apply(o0, q, g, state_in, scale, limit, out_dtype or q.dtype)


__all__ = ["LocalPass", "local_states", "local_output", "segment_state", "cum_log_decay", "total_log_decay",
           "add_incoming_state", "acc_dtype"]
