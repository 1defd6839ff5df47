"""`sp_linear_attention`: exact sequence-parallel linear attention (LASP-2 all-gather, ZeCO All-Scan, LASP-1 ring).

Every method runs the same local pass (lsp.ops.linear.local, in the backend that runs the op) on the held segments
and differs only in the exchange step (lsp.parallel.methods: the registered method over the diagonal family of
lsp.parallel.affine, A_i = Diag(exp a_i)):

    1. h, S_i = local_states(k_i, v_i, g_i)            chunk states and local state of each held segment, once
    2. start the exchange of (S_i, a_i = Σ_{t in i} g_t)   allgather launches its collective here
    3. o0_i = local_output(q_i, h)                      zero-state output from phase 1's chunk states (fp32),
                                                         overlapping the exchange
    4. E_i = entering state of segment i                finish the exchange
    5. o_i = o0_i + scale · (q_i ⊙ exp(cum_g_i)) E_i    add_incoming_state, rounded once to q's dtype

The segment plan (which edges a state crosses, how documents cut segments) is built once per batch by the
SPContext. With packed documents (global cu_seqlens, B == 1) the held segments are laid end to end in one packed
row cut at every segment edge and every document start, so one local call serves all of them; a state crosses a
segment edge only when no document starts there, and survives a segment only when no document starts inside it.
The numerics do not depend on an enclosing autocast (the state math runs in fp32, fp64 for fp64 inputs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lsp.ops.linear import add_incoming_state, local_output, local_states, total_log_decay
from lsp.ops.linear.checks import acc_dtype, check_linear_inputs, exact_numerics

from .affine import DIAGONAL
from .collectives import depend, join_token
from .comm import ReplicateSum
from .context import SPContext
from .methods import exchange, sp_method
from .segments import SegmentPlan


@dataclass(frozen=True)
class Shape:
    """Shape of one call: R rank rows (W emulated, 1 real) x L held segments x B batch rows of Ts tokens."""

    R: int
    L: int
    B: int
    Ts: int
    H: int
    K: int
    V: int

    @property
    def rows(self) -> int:
        return self.R * self.L * self.B


def _to_seg_rows(x, s: Shape):
    # [R·B, L·Ts, ...] -> [R·L·B, Ts, ...] with rows ordered (rank row, local segment, batch row)
    y = x.reshape(s.R, s.B, s.L, s.Ts, *x.shape[2:]).transpose(1, 2)
    return y.reshape(s.rows, s.Ts, *x.shape[2:])


def _from_seg_rows(y, s: Shape):
    # inverse of _to_seg_rows
    x = y.reshape(s.R, s.L, s.B, *y.shape[1:]).transpose(1, 2)
    return x.reshape(s.R * s.B, s.L * s.Ts, *y.shape[2:])


def _check(q, sp, method, initial_state, cu_seqlens, s: Shape):
    sp_method(method)   # an unknown name raises here, before any work
    if q.shape[0] % sp.rows:
        raise ValueError(f"q's batch {q.shape[0]} must be a multiple of the {sp.rows} emulated ranks (use sp.shard)")
    if cu_seqlens is not None and s.B != 1:
        raise ValueError(f"cu_seqlens requires B == 1 (packed sequences), got B={s.B} per rank")
    if initial_state is not None:
        N = s.B if cu_seqlens is None else cu_seqlens.numel() - 1
        if tuple(initial_state.shape) != (N, s.H, s.K, s.V):
            raise ValueError(f"initial_state must have shape [{'N' if cu_seqlens is not None else 'B'}, H, K, V]="
                             f"{[N, s.H, s.K, s.V]}, got {tuple(initial_state.shape)}")


def sp_linear_attention(q, k, v, g=None, *, sp, method=None, scale=None, initial_state=None,
                        output_final_state=False, cu_seqlens=None, backend="auto", scan_blocks=None):
    r"""Sequence-parallel linear attention; equals `lsp.ops.linear_attention` on the gathered sequence.

    Recurrence (per batch row / document and head): S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t, o_t = scale · q_t S_t.

    Args:
        q, k: [R·B, T_local, H, K]; v: [R·B, T_local, H, V] local shards from `sp.shard` (R = W emulated, 1 real).
        g: None, [H], [R·B, T_local, H] or [R·B, T_local, H, K] log-decay (<= 0), sharded like q.
        sp: the SPContext. method: None (the context's) or a registered SP method (`lsp.parallel.sp_methods()`:
            LASP-2 all-gather, ZeCO All-Scan with `scan_blocks` blocks along V, default the context's, LASP-1 ring).
        initial_state: [B, H, K, V] ([N, H, K, V] with cu_seqlens) on every rank (one copy in emulation); its
            gradient lands on the rank holding the first token of each sequence (sum over ranks = the gradient).
        output_final_state: return the state after the last token of every sequence on every rank ([B or N, H, K,
            V]; emulated: [R·(B or N), H, K, V], one replica per virtual rank). Backward sums the replicas'
            gradients over ranks (global loss = sum of per-rank losses).
        cu_seqlens: GLOBAL int32 [N + 1] boundaries of packed documents (B == 1).
        backend: the local pass's backend ("auto": Triton on CUDA, chunked torch elsewhere).

    Every rank joins every collective (forward and backward) whenever grad mode is on, whatever requires grad where.

    Returns:
        o_local [R·B, T_local, H, V] in q's dtype, final_state or None.
    """
    if not isinstance(sp, SPContext):
        raise ValueError(f"sp must be an lsp.parallel.SPContext, got {type(sp).__name__}")
    check_linear_inputs(q, k, v, g, None, None)
    method = sp.method if method is None else method
    scan_blocks = sp.scan_blocks if scan_blocks is None else scan_blocks
    R, L = sp.rows, sp.segments_per_rank
    s = Shape(R, L, q.shape[0] // R, sp.segment_length(q.shape[1]), q.shape[2], q.shape[3], v.shape[-1])
    _check(q, sp, method, initial_state, cu_seqlens, s)
    plan = sp.segment_plan(q.shape[1], cu_seqlens)
    scale = s.K ** -0.5 if scale is None else scale
    with exact_numerics(q):
        return _forward(q, k, v, g, sp, method, scan_blocks, scale, initial_state, output_final_state, backend,
                        plan, s)


def _forward(q, k, v, g, sp, method, scan_blocks, scale, initial_state, output_final_state, backend, plan, s):
    dt = acc_dtype(q.dtype)
    token = join_token()
    q_r, k_r, v_r = (_to_seg_rows(x, s) for x in (q, k, v))
    g_r = g if g is None or g.dim() == 1 else _to_seg_rows(g, s)
    init = _local_initial_states(initial_state, sp, plan, s, dt)
    if plan.packed:
        cu = plan.local_boundaries()  # host boundaries with their list recorded: the op reads nothing back
        lp, piece_states = local_states(_packed_row(k_r), _packed_row(v_r), _packed_row(g_r), initial_state=init,
                                        cu_seqlens=cu, backend=backend)
        S = piece_states[plan.tensor("last_piece", q.device)]
    else:
        lp, S = local_states(k_r, v_r, g_r, initial_state=init, backend=backend)
    a = total_log_decay(g_r, s.rows, s.Ts, s.H, dt)
    finish = exchange(S.reshape(s.R, s.L, s.B, s.H, s.K, s.V), None if a is None else a.reshape(s.R, s.L, s.B,
                      s.H, -1), token, sp, plan, method, scan_blocks, DIAGONAL, method)
    o0 = local_output(_packed_row(q_r) if plan.packed else q_r, lp, scale, out_dtype=dt)
    o0 = o0.reshape(s.rows, s.Ts, s.H, s.V)
    E, token = finish()
    E = E.reshape(s.rows, s.H, s.K, s.V)
    limit = plan.tensor("first_internal", q.device) if plan.inner_starts else None
    o = _from_seg_rows(_corrected(o0, q_r, g_r, E, scale, limit, q.dtype, _entered_rows(sp, plan, s)), s)
    o = depend(o, token)   # every rank joins the exchange's backward, also one whose rows need no correction
    if not output_final_state:
        return o, None
    if plan.packed:
        final = _packed_finals(piece_states, E, g_r, plan, s, dt)
    else:
        final = _last_segment_final(S, a, E, sp, s)
    final = ReplicateSum.apply(final.contiguous(), token, sp.comm, "final_state")
    return o, (final[0] if not sp.emulated else final.reshape(-1, *final.shape[2:]))


def _entered_rows(sp, plan: SegmentPlan, s: Shape) -> tuple[int, int]:
    # [lo, hi): the smallest block of held rows that contains every row whose entering state can be nonzero (a
    # segment that is not the first and that no document start cuts off); outside it E is zero by construction
    def build():
        held = ((r, l) for r in sp.comm.ranks for l in range(s.L) for _ in range(s.B))
        live = [row for row, (r, l) in enumerate(held) if (i := sp.rank_segments(r)[l]) > 0 and plan.cont[i]]
        return (live[0], live[-1] + 1) if live else (0, 0)

    return plan.derived(("entered_rows", s.B), build)


def _corrected(o0, q_r, g_r, E, scale, limit, dtype, rows: tuple[int, int]):
    # o0 + the incoming-state correction on the rows [lo, hi) that can have one; the others are o0 rounded once
    lo, hi = rows
    if (lo, hi) == (0, o0.shape[0]):
        return add_incoming_state(o0, q_r, g_r, E, scale, limit=limit, out_dtype=dtype)
    g_cut = g_r if g_r is None or g_r.dim() == 1 else g_r[lo:hi]   # a per-head decay [H] applies to every row
    parts = [o0[:lo].to(dtype), o0[hi:].to(dtype)]
    if hi > lo:
        parts.insert(1, add_incoming_state(o0[lo:hi], q_r[lo:hi], g_cut, E[lo:hi], scale,
                                           limit=None if limit is None else limit[lo:hi], out_dtype=dtype))
    return torch.cat(parts)


def _packed_row(x):
    # [rows, Ts, ...] -> [1, rows·Ts, ...]: the held segments end to end in one packed row (g of shape [H] as is)
    return x if x is None or x.dim() == 1 else x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])


def _local_initial_states(initial_state, sp, plan: SegmentPlan, s: Shape, dt):
    # -> states entering each local row ([R·L·B] rows) or piece (packed), or None
    if initial_state is None:
        return None
    init = initial_state.to(dt)
    if plan.packed:  # one gather: index 0 is a zero state, d + 1 the initial state of document d
        table = torch.cat([init.new_zeros(1, *init.shape[1:]), init])
        return table[plan.tensor("piece_init", init.device)]
    first = sp.owner(0)
    zero = init.new_zeros(s.B, s.H, s.K, s.V)
    return torch.cat([init if (r, l) == first else zero for r in sp.comm.ranks for l in range(s.L)])


def _last_segment_final(S, a, E, sp, s: Shape):
    # final = A_{n-1} E_{n-1} + S_{n-1} on the owner of the last segment, zeros elsewhere -> [R, B, H, K, V]
    r_last, l_last = sp.owner(sp.num_segments - 1)
    S6, E6 = (x.reshape(s.R, s.L, s.B, s.H, s.K, s.V) for x in (S, E))
    out = []
    for r in sp.comm.ranks:
        row = sp.comm.row(r)
        if r != r_last:
            out.append(torch.zeros_like(S6[row, 0]))
            continue
        a_last = None if a is None else a.reshape(s.R, s.L, s.B, s.H, -1)[row, l_last]
        E_last = E6[row, l_last]
        out.append(DIAGONAL.apply(DIAGONAL.map(a_last, 1, E_last), E_last) + S6[row, l_last])
    return torch.stack(out)


def _packed_finals(piece_states, E, g_r, plan: SegmentPlan, s: Shape, dt):
    # final state of every document whose last token is held here, zeros elsewhere -> [R, N, H, K, V]
    out = piece_states.new_zeros(s.R, plan.num_docs, s.H, s.K, s.V)
    if not plan.end_docs:
        return out
    dev = out.device
    states = piece_states[plan.tensor("end_pieces", dev)]
    for j, seg_row, end in plan.carried_ends:  # the state entering the segment survives up to the document's end
        decay = 1.0 if g_r is None else total_log_decay(_row_prefix(g_r, seg_row, end), 1, end + 1, s.H, dt)
        carried = (decay if g_r is None else decay.exp()[..., None]) * E[seg_row : seg_row + 1]
        states = states.index_add(0, torch.tensor([j], device=dev), carried)
    return out.index_put((plan.tensor("end_rank_rows", dev), plan.tensor("end_docs", dev)), states)


def _row_prefix(g_r, seg_row: int, end: int):
    # the log-decays of tokens 0..end of one segment row (g of shape [H] applies to every token)
    return g_r if g_r.dim() == 1 else g_r[seg_row : seg_row + 1, : end + 1]
