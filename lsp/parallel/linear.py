"""`sp_linear_attention`: exact sequence-parallel linear attention (LASP-2 all-gather, ZeCO All-Scan, LASP-1 ring).

Every method runs the same local pass (lsp.ops.linear.local) on each held segment and differs only in the
exchange step (lsp.parallel.exchange):

    1. S_i = segment_state(k_i, v_i, g_i)                     local state of each held segment (cheap)
    2. start the exchange of (S_i, a_i = Σ_{t in i} g_t)      allgather launches its collective here
    3. o_i = linear_attention(q_i, k_i, v_i, g_i)             zero-state output, overlapping the exchange
    4. E_i = entering state of segment i                     finish the exchange
    5. o_i += scale · (q_i ⊙ exp(cum_g_i)) E_i                add_incoming_state

With packed documents (global cu_seqlens, B == 1) the held segments are laid end to end in one packed row cut at
every segment edge and every document start, so one local call serves all of them; a state crosses a segment edge
only when no document starts there, and survives a segment only when no document starts inside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lsp.ops.linear import add_incoming_state, cum_log_decay, linear_attention, segment_state
from lsp.ops.linear.checks import acc_dtype, check_linear_inputs

from .comm import ReplicateSum
from .context import SPContext
from .exchange import exchange

METHODS = ("allgather", "allscan", "ring")


@dataclass
class SegmentPlan:
    """Static (host-side) description of the segments: which edges and segments a state crosses."""

    cont: list[int]                 # per global segment: 1 if the state entering it is carried from the previous one
    passes: list[int]               # per global segment: 1 if no document starts strictly inside it
    # packed (cu_seqlens) case only, for the held segments in (row, local segment) order:
    local_cu: torch.Tensor | None = None
    piece_docs: list[int] = field(default_factory=list)     # document of every local piece
    piece_fresh: list[bool] = field(default_factory=list)   # piece starts at its document's start
    last_piece: list[int] = field(default_factory=list)     # per held segment row: index of its last piece
    first_internal: list[int] = field(default_factory=list)  # per held segment row: offset of its first inner start
    doc_ends: dict = field(default_factory=dict)            # doc -> (seg row, piece, end offset, carried)


def plan_segments(sp: SPContext, Ts: int, cu_seqlens: torch.Tensor | None) -> SegmentPlan:
    n = sp.num_segments
    if cu_seqlens is None:
        return SegmentPlan(cont=[0] + [1] * (n - 1), passes=[1] * n)
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != n * Ts or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to the global length {n * Ts} (no empty documents), "
                         f"got {bounds}")
    starts = bounds[:-1]
    inner = [[b - i * Ts for b in starts if i * Ts < b < (i + 1) * Ts] for i in range(n)]
    plan = SegmentPlan(cont=[0] + [0 if i * Ts in starts else 1 for i in range(1, n)],
                       passes=[0 if inner[i] else 1 for i in range(n)])
    cu, seg_row = [], 0
    for r in sp.comm.ranks:
        for i in sp.rank_segments(r):
            base = seg_row * Ts
            doc0 = sum(1 for b in starts if b <= i * Ts) - 1
            offsets = [0] + inner[i]
            for j, off in enumerate(offsets):
                doc = doc0 + j
                plan.piece_docs.append(doc)
                plan.piece_fresh.append(off > 0 or not plan.cont[i])
                cu.append(base + off)
                end = bounds[doc + 1] - 1 - i * Ts
                if end < Ts:  # the document ends in this piece
                    plan.doc_ends[doc] = (seg_row, len(plan.piece_docs) - 1, end, j == 0 and bool(plan.cont[i]))
            plan.last_piece.append(len(plan.piece_docs) - 1)
            plan.first_internal.append(inner[i][0] if inner[i] else Ts)
            seg_row += 1
    plan.local_cu = torch.tensor(cu + [seg_row * Ts], dtype=torch.int32, device=cu_seqlens.device)
    return plan


def _to_seg_rows(x, R, L):
    # [R·B, L·Ts, ...] -> [R·L·B, Ts, ...] with rows ordered (rank row, local segment, batch row)
    B, T = x.shape[0] // R, x.shape[1]
    y = x.reshape(R, B, L, T // L, *x.shape[2:]).transpose(1, 2)
    return y.reshape(R * L * B, T // L, *x.shape[2:])


def _from_seg_rows(y, R, L):
    # inverse of _to_seg_rows
    B = y.shape[0] // (R * L)
    x = y.reshape(R, L, B, *y.shape[1:]).transpose(1, 2)
    return x.reshape(R * B, L * y.shape[1], *y.shape[2:])


def _check(q, k, v, g, sp, method, initial_state, cu_seqlens, B, H, K, V):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if q.shape[0] % sp.rows:
        raise ValueError(f"q's batch {q.shape[0]} must be a multiple of the {sp.rows} emulated ranks (use sp.shard)")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens requires B == 1 (packed sequences), got B={B} per rank")
    if initial_state is not None:
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        if tuple(initial_state.shape) != (N, H, K, V):
            raise ValueError(f"initial_state must have shape [{'N' if cu_seqlens is not None else 'B'}, H, K, V]="
                             f"{[N, H, K, V]}, got {tuple(initial_state.shape)}")


def sp_linear_attention(q, k, v, g=None, *, sp, method="allgather", scale=None, initial_state=None,
                        output_final_state=False, cu_seqlens=None, backend="auto", scan_blocks=4):
    r"""Sequence-parallel linear attention; equals `lsp.ops.linear_attention` on the gathered sequence.

    Recurrence (per batch row / document and head): S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t, o_t = scale · q_t S_t.

    Args:
        q, k: [R·B, T_local, H, K]; v: [R·B, T_local, H, V] local shards from `sp.shard` (R = W emulated, 1 real).
        g: None, [H], [R·B, T_local, H] or [R·B, T_local, H, K] log-decay (<= 0), sharded like q.
        sp: the SPContext. method: "allgather" (LASP-2), "allscan" (ZeCO All-Scan, `scan_blocks` blocks along K),
            "ring" (LASP-1).
        initial_state: [B, H, K, V] ([N, H, K, V] with cu_seqlens) on every rank (one copy in emulation); its
            gradient lands on the rank holding the first token of each sequence (sum over ranks = the gradient).
        output_final_state: return the state after the last token of every sequence on every rank ([B or N, H, K,
            V]; emulated: [R·(B or N), H, K, V], one replica per virtual rank). Backward sums the replicas'
            gradients over ranks (global loss = sum of per-rank losses).
        cu_seqlens: GLOBAL int32 [N + 1] boundaries of packed documents (B == 1).

    Returns:
        o_local [R·B, T_local, H, V] in q's dtype, final_state or None.
    """
    if not isinstance(sp, SPContext):
        raise ValueError(f"sp must be an lsp.parallel.SPContext, got {type(sp).__name__}")
    check_linear_inputs(q, k, v, g, None, None)
    R, L = sp.rows, sp.segments_per_rank
    B, T_local, H, K = q.shape[0] // R, q.shape[1], q.shape[2], q.shape[3]
    V = v.shape[-1]
    _check(q, k, v, g, sp, method, initial_state, cu_seqlens, B, H, K, V)
    Ts = sp.segment_length(T_local)
    scale = K ** -0.5 if scale is None else scale
    dt = acc_dtype(q.dtype)
    plan = plan_segments(sp, Ts, cu_seqlens)
    packed = cu_seqlens is not None

    # shared local pass, on the held segments as rows [R·L·B, Ts, ...]
    q_r, k_r, v_r = (_to_seg_rows(x, R, L) for x in (q, k, v))
    g_r = g if g is None or g.dim() == 1 else _to_seg_rows(g, R, L)
    rows = q_r.shape[0]
    init = _local_initial_states(initial_state, sp, plan, rows, H, K, V, dt, q.device, packed)
    if packed:
        kp, vp = k_r.reshape(1, rows * Ts, H, K), v_r.reshape(1, rows * Ts, H, V)
        gp = g_r if g_r is None or g_r.dim() == 1 else g_r.reshape(1, rows * Ts, *g_r.shape[2:])
        piece_states = segment_state(kp, vp, gp, initial_state=init, cu_seqlens=plan.local_cu)
        S = piece_states[plan.last_piece]
    else:
        S = segment_state(k_r, v_r, g_r, initial_state=init)
    cum_g = cum_log_decay(g_r, rows, Ts, H, dt)
    a = None if cum_g is None else cum_g[:, -1]
    finish = exchange(S.reshape(R, L, B, H, K, V), None if a is None else a.reshape(R, L, B, H, -1),
                      sp, plan, method, scan_blocks)
    if packed:
        qp = q_r.reshape(1, rows * Ts, H, K)
        o0, _ = linear_attention(qp, kp, vp, gp, scale=scale, initial_state=init, cu_seqlens=plan.local_cu,
                                 backend=backend)
        o0 = o0.reshape(rows, Ts, H, V)
    else:
        o0, _ = linear_attention(q_r, k_r, v_r, g_r, scale=scale, initial_state=init, backend=backend)
    E = finish().reshape(rows, H, K, V)
    q_in = q_r
    if packed and any(f < Ts for f in plan.first_internal):  # tokens after an inner document start see no E
        t = torch.arange(Ts, device=q.device)
        keep = t[None, :] < torch.tensor(plan.first_internal, device=q.device)[:, None]
        q_in = q_r * keep[:, :, None, None].to(q_r.dtype)
    o = _from_seg_rows(add_incoming_state(o0, q_in, cum_g, E, scale), R, L)
    if not output_final_state:
        return o, None
    if packed:
        final = _packed_finals(piece_states, E, cum_g, sp, plan, cu_seqlens.numel() - 1)
    else:
        final = _last_segment_final(S, a, E, sp, R, L, B)
    # make final depend on E on every rank, so that every rank's backward runs the final-state all_reduce before
    # the exchange's collectives (ranks not owning a final would otherwise order them differently and deadlock)
    final = final + 0.0 * E.sum()
    final = ReplicateSum.apply(final.contiguous(), sp.comm, "final_state")
    return o, (final[0] if not sp.emulated else final.reshape(-1, *final.shape[2:]))


def _local_initial_states(initial_state, sp, plan, rows, H, K, V, dt, device, packed):
    # -> states entering each local row ([R·L·B] rows) or piece (packed), or None
    if initial_state is None:
        return None
    init = initial_state.to(dt)
    zero = init.new_zeros(1, H, K, V)
    if packed:
        return torch.cat([init[d : d + 1] if fresh else zero for d, fresh in zip(plan.piece_docs, plan.piece_fresh)])
    B = init.shape[0]
    first = sp.owner(0)
    parts = [init if (r, l) == first else zero.expand(B, H, K, V) for r in sp.comm.ranks
             for l in range(sp.segments_per_rank)]
    return torch.cat(parts)


def _last_segment_final(S, a, E, sp, R, L, B):
    # final = A_{n-1} E_{n-1} + S_{n-1} on the owner of the last segment, zeros elsewhere -> [R, B, H, K, V]
    r_last, l_last = sp.owner(sp.num_segments - 1)
    S6, E6 = S.reshape(R, L, B, *S.shape[1:]), E.reshape(R, L, B, *E.shape[1:])
    a5 = None if a is None else a.reshape(R, L, B, *a.shape[1:])
    out = []
    for r in sp.comm.ranks:
        row = sp.comm.row(r)
        if r != r_last:
            out.append(torch.zeros_like(S6[row, 0]))
            continue
        decay = 1.0 if a5 is None else a5[row, l_last].exp()[..., None]
        out.append(decay * E6[row, l_last] + S6[row, l_last])
    return torch.stack(out)


def _packed_finals(piece_states, E, cum_g, sp, plan, N):
    # final state of every document whose last token is held here, zeros elsewhere -> [R, N, H, K, V]
    L = sp.segments_per_rank
    zero = torch.zeros_like(piece_states[0])
    per_row = [[zero] * N for _ in sp.comm.ranks]
    for doc, (seg_row, piece, end, carried) in plan.doc_ends.items():
        state = piece_states[piece]
        if carried:
            decay = 1.0 if cum_g is None else cum_g[seg_row, end].exp()[..., None]
            state = state + decay * E[seg_row]
        per_row[seg_row // L][doc] = state
    return torch.stack([torch.stack(r) for r in per_row])
