r"""`sp_delta_rule`: exact sequence-parallel (gated) delta rule.

The delta rule's state map over a segment is affine, S ↦ M S + S_loc, with M = Π (I − β_t k_t k_tᵀ) Diag(exp g_t)
(K × K; a gate per head or per key channel, KDA, only changes the local pass) and S_loc the state the segment
reaches from a zero entering state. Every rank

    1. chunks its held segments once (UT transform, `prepare_chunks`) and composes their maps [M_i | S_i]
       (`sequence_maps`: the chunk scan on the augmented state [I | init]),
    2. exchanges them to get the state entering each held segment, with c_{i+1} = 0 when a document starts at
       segment i+1 and p_i = 0 when one starts inside segment i:

           E_0 = 0,        E_{i+1} = c_{i+1} (p_i M_i E_i + S_i)

    3. enters every chunk with S_c + P_c E (the prefix maps P_c come from step 1's scan: one batched product, no
       second scan) and computes the outputs (`enter_sequences`, `chunk_output`); the same product gives the final
       state of every sequence that ends on this rank.

Backward of step 2 (G_i the total gradient of E_i, gE_i its direct part, X_{i+1} = c_{i+1} G_{i+1}):

    G_i = gE_i + p_i M_iᵀ X_{i+1},      ∂S_i = X_{i+1},      ∂M_i = p_i X_{i+1} E_iᵀ

Step 2 is the registered SP method (lsp.parallel.methods) over the dense family of lsp.parallel.affine (A_i =
p_i M_i, K × K): the same all-gather, All-Scan (blocks along V, half chains and tree broadcast on zigzag) and ring
that serve the decay-only layers. The all-gather sends [S_i | M_i] (K × (V + K) per head) forward and [gE_i | M_i]
backward; the chains send the state (and, on All-Scan's second half chain, the composed K × K map).

Every collective takes a join token (lsp.parallel.collectives), so every rank runs every backward collective
whatever requires grad where; the exchange hands a token to the final-state reduction,
which fixes their backward order on every rank; a checkpoint recompute replays the exchange and the conv halo.
State math runs in fp32 (fp64 for fp64 inputs) with autocast disabled.
"""
from __future__ import annotations

import torch

from lsp.ops.delta import (
    check_delta_inputs,
    chunk_output,
    delta_rule,
    enter_sequences,
    prepare_chunks,
    repeat_heads,
    sequence_maps,
    short_conv,
)
from lsp.ops.delta.api import resolve_delta_backend
from lsp.ops.linear.checks import acc_dtype
from lsp.ops.probe import kernel_case

from .affine import DENSE
from .collectives import join_token, replayed
from .comm import ReplicateSum
from .context import SPContext
from .linear import Shape, _check, _from_seg_rows, _local_initial_states, _to_seg_rows
from .methods import exchange


def _held(sp, per_segment) -> torch.Tensor:
    # [R, L, ...]: per_segment(i) for the segments i held by each rank row, in local order
    return torch.stack([torch.stack([per_segment(i) for i in sp.rank_segments(r)]) for r in sp.comm.ranks])


def sp_delta_rule(q, k, v, beta, g=None, *, sp, method=None, scale=None, initial_state=None,
                  output_final_state=False, cu_seqlens=None, backend="auto", scan_blocks=None):
    r"""Sequence-parallel (gated) delta rule; equals `lsp.ops.delta_rule` on the gathered sequence.

    Recurrence (per batch row / document and value head): S_t = (I − β_t k_t k_tᵀ) Diag(exp g_t) S_{t−1}
    + β_t k_t v_tᵀ, o_t = scale · q_t S_t; value head j reads q/k head j // G.

    Args:
        q, k: [R·B, T_local, H, K]; v: [R·B, T_local, HV, V] (HV = G·H); beta: [R·B, T_local, HV]; g: None,
            [R·B, T_local, HV] (a gate per head) or [R·B, T_local, HV, K] (per key channel, KDA): local shards
            from `sp.shard` (R = W emulated, 1 real).
        sp: the SPContext. method: None (the context's) or a registered SP method (`lsp.parallel.sp_methods()`);
            All-Scan cuts the state into `scan_blocks` blocks along V.
        initial_state: [B, HV, K, V] ([N, HV, K, V] with cu_seqlens) on every rank; its gradient lands on the rank
            holding the first token of each sequence.
        output_final_state: the state after the last token of every sequence, on every rank ([B or N, HV, K, V];
            emulated [R·(B or N), HV, K, V]). Use it in the loss on every rank or on none (its backward is a
            collective).
        cu_seqlens: GLOBAL int32 [N + 1] boundaries of packed documents (B == 1).
        backend: "auto" / "torch" (the chunked path) or "triton" (its chunk scan in Triton: g None or one gate per
            head); not "naive".

    Returns:
        o_local [R·B, T_local, HV, V] in q's dtype, final_state or None.
    """
    if not isinstance(sp, SPContext):
        raise ValueError(f"sp must be an lsp.parallel.SPContext, got {type(sp).__name__}")
    method = sp.method if method is None else method
    scan_blocks = sp.scan_blocks if scan_blocks is None else scan_blocks
    groups = check_delta_inputs(q, k, v, beta, g, None, None)
    if resolve_delta_backend(backend, q.device) == "naive":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton' under sequence parallelism, got {backend!r}")
    R, L = sp.rows, sp.segments_per_rank
    s = Shape(R, L, q.shape[0] // R, sp.segment_length(q.shape[1]), v.shape[2], q.shape[3], v.shape[-1])
    _check(q, sp, method, initial_state, cu_seqlens, s)
    scale = s.K ** -0.5 if scale is None else scale
    if sp.world_size == 1:  # both layouts hold the whole sequence in order: the op itself, no map to compose
        return delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=backend)
    q, k = repeat_heads(q, groups), repeat_heads(k, groups)  # value head j reads q/k head j // G
    with torch.autocast(device_type=q.device.type, enabled=False):
        backend = resolve_delta_backend(backend, q.device, kernel_case("delta_rule", k, v, g))
        o, final = _sp_delta(q, k, v, beta, g, sp, method, scale, initial_state, output_final_state, cu_seqlens,
                             scan_blocks, s, backend)
    return o, final


def _sp_delta(q, k, v, beta, g, sp, method, scale, initial_state, output_final_state, cu_seqlens, scan_blocks,
              s: Shape, scan_backend="torch"):
    prepare = lambda rows, cu: prepare_chunks(*rows, cu, scan_backend=scan_backend)  # noqa: E731
    return sp_chunked_rule(q, (k, v, beta, g), prepare, chunk_output, "delta", sp, method, scale, initial_state,
                           output_final_state, cu_seqlens, scan_blocks, s)


def sp_chunked_rule(q, per_token, prepare, output, family_tag, sp, method, scale, initial_state, output_final_state,
                    cu_seqlens, scan_blocks, s: Shape):
    """The three steps of the module docstring for any rule in the delta rule's chunk form (DeltaChunks), on the
    held segments as rows [R·L·B, Ts, ...].

    per_token: the local shards besides q (each [R·B, T_local, H, ...] or None); prepare(rows, local_cu) -> chunks;
    output(q_rows, chunks, entering, scale) -> o rows; family_tag names the comm-accounting tags ("delta_ring", ..).
    """
    R, L, B, Ts, H, K, V = s.R, s.L, s.B, s.Ts, s.H, s.K, s.V
    plan = sp.segment_plan(q.shape[1], cu_seqlens)
    packed = plan.packed
    rows_of = lambda x: None if x is None else _to_seg_rows(x, s)  # noqa: E731
    q_r, *token_rows = map(rows_of, (q, *per_token))
    rows = s.rows
    init = _local_initial_states(initial_state, sp, plan, s, acc_dtype(q.dtype))
    if packed:  # held segments end to end in one packed row, cut at segment edges and document starts
        flat = lambda x: None if x is None else x.reshape(1, rows * Ts, *x.shape[2:])  # noqa: E731
        q_r, *token_rows = map(flat, (q_r, *token_rows))
    local_cu = plan.local_boundaries() if packed else None
    chunks = prepare(token_rows, local_cu)
    entering_aug, maps = sequence_maps(chunks, init)            # maps: [rows or pieces, H, K, K + V] = [M | S_loc]
    first = [0] + [p + 1 for p in plan.last_piece[:-1]] if packed else list(range(rows))
    last = plan.last_piece if packed else list(range(rows))
    seg = lambda x, idx: x[idx].reshape(R, L, B, H, K, -1)  # noqa: E731
    E, token = exchange(seg(maps[..., K:], last), seg(maps[..., :K], first), join_token(), sp, plan, method,
                        scan_blocks, DENSE, f"{family_tag}_{method}")()
    E = E.reshape(rows, H, K, V)
    extra = E if not packed else _pieces_entering(E, first, maps.shape[0])
    chunk_states, finals = enter_sequences(chunks, entering_aug, maps, extra)
    o = output(q_r, chunks, chunk_states, scale).to(q.dtype)
    o = _from_seg_rows(o.reshape(rows, Ts, H, V), s)
    if not output_final_state:
        return o, None
    final = _owned_finals(finals, sp, plan, s)
    final = ReplicateSum.apply(final.contiguous(), token, sp.comm, f"{family_tag}_final_state")
    return o, (final[0] if not sp.emulated else final.reshape(-1, *final.shape[2:]))


def _pieces_entering(E, first, n_pieces):
    # E: [rows, H, K, V] entering each held segment -> [pieces, H, K, V]: E on each segment's first piece, else 0
    index = torch.zeros(n_pieces, dtype=torch.long, device=E.device)
    index[first] = torch.arange(1, len(first) + 1, device=E.device)
    return torch.cat([torch.zeros_like(E[:1]), E]).index_select(0, index)


def _owned_finals(finals, sp, plan, s: Shape):
    # final state of every sequence whose last token is held here, zeros elsewhere -> [R, B or N, H, K, V]
    if not plan.packed:
        r_last, l_last = sp.owner(sp.num_segments - 1)
        per_seg = finals.reshape(s.R, s.L, s.B, *finals.shape[1:])
        return torch.stack([per_seg[sp.comm.row(r), l_last] if r == r_last else torch.zeros_like(per_seg[0, 0])
                            for r in sp.comm.ranks])
    out = finals.new_zeros(s.R, plan.num_docs, *finals.shape[1:])
    if not plan.end_docs:
        return out
    dev = out.device
    ends = finals[plan.tensor("end_pieces", dev)]
    return out.index_put((plan.tensor("end_rank_rows", dev), plan.tensor("end_docs", dev)), ends)


# ---------------------------------------------------------------------------------------------- short conv halo


class GatherTails(torch.autograd.Function):
    """Halo of every held segment: the last k-1 inputs of the previous global segment (zeros for segment 0), by one
    all_gather of every segment's tail. Backward (the mirror): one all_gather of the halo gradients, and each tail
    takes the gradient of the halo it became."""

    @staticmethod
    def forward(ctx, token, tails, sp):
        # tails: [R, L, B, k - 1, D] -> halo [R, L, B, k - 1, D]
        flat = tails.contiguous().reshape(tails.shape[0], -1)
        every = replayed(lambda: sp.comm.all_gather(flat, "delta_conv_halo"))
        every = every.reshape(sp.world_size, *tails.shape[1:])
        ctx.sp = sp
        return _held(sp, lambda i: every[sp.owner(i - 1)] if i > 0 else torch.zeros_like(every[0, 0]))

    @staticmethod
    def backward(ctx, g_halo):
        sp = ctx.sp
        every = sp.comm.all_gather(g_halo.contiguous().reshape(g_halo.shape[0], -1), "delta_conv_halo:bwd")
        every = every.reshape(sp.world_size, *g_halo.shape[1:])
        n = sp.num_segments
        g_tails = _held(sp, lambda i: every[sp.owner(i + 1)] if i + 1 < n else torch.zeros_like(every[0, 0]))
        return None, g_tails, None


def sp_short_conv(x, weight, bias=None, *, sp, cu_seqlens=None):
    """Sequence-parallel `lsp.ops.delta.short_conv`: equals the op on the gathered sequence.

    x: [R·B, T_local, D] local shard from `sp.shard`; weight: [D, k]; bias: [D] or None; cu_seqlens: GLOBAL int32
    [N + 1] document boundaries (B == 1). Each held segment gets its k-1 predecessors (the halo) from the previous
    segment's owner; inputs of another document are masked out, so the halo is zero at document starts.
    Returns y_local [R·B, T_local, D].
    """
    if not isinstance(sp, SPContext):
        raise ValueError(f"sp must be an lsp.parallel.SPContext, got {type(sp).__name__}")
    R, L, k = sp.rows, sp.segments_per_rank, weight.shape[-1]
    B, D = x.shape[0] // R, x.shape[-1]
    Ts = sp.segment_length(x.shape[1])
    if Ts < k - 1:
        raise ValueError(f"segments of {Ts} tokens are shorter than the conv halo ({k - 1} tokens): use fewer ranks")
    s = Shape(R, L, B, Ts, 1, 1, D)
    rows = _to_seg_rows(x, s)                                                # [R·L·B, Ts, D]
    halo = GatherTails.apply(join_token(), rows[:, Ts - (k - 1) :].reshape(R, L, B, k - 1, D), sp)
    starts = [s * Ts - (k - 1) for r in sp.comm.ranks for s in sp.rank_segments(r)]
    pos = torch.tensor(starts, device=x.device)[:, None] + torch.arange(k - 1 + Ts, device=x.device)  # [R·L, ..]
    docs = torch.zeros_like(pos) if cu_seqlens is None else (
        torch.searchsorted(cu_seqlens.to(x.device).long(), pos, right=True) - 1)
    seq_ids = torch.where(pos < 0, -1, docs).repeat_interleave(B, dim=0)     # [R·L·B, k - 1 + Ts]
    y = short_conv(rows, weight, bias, halo=halo.reshape(-1, k - 1, D), seq_ids=seq_ids)
    return _from_seg_rows(y, s)
