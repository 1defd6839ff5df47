"""The cross-rank step of sequence-parallel linear attention: entering states of every segment.

The sequence is cut into n ordered segments (W contiguous, 2W zigzag); rank rows hold L of them. Each segment i
brings, from the shared local pass, its local state S_i (state at its end from a zero entering state, including
the initial states of documents that start inside it) and its total log-decay a_i. The entering states obey

    E_0 = 0,        E_{i+1} = c_{i+1} · (A_i ⊙ E_i + S_i),        A_i = p_i · exp(a_i)

where c_{i+1} = 0 when a document starts exactly at segment i+1 (no state crosses that edge) and p_i = 0 when a
document starts strictly inside segment i (the incoming state does not survive it). Backward, with G_i the total
gradient of E_i and gE_i its direct part:

    G_i = gE_i + c_{i+1} A_i ⊙ G_{i+1},     ∂S_i = c_{i+1} G_{i+1},     ∂a_i = Σ_v (c_{i+1} G_{i+1} ⊙ E_i) ⊙ A_i

Methods differ only in how the states travel:

* allgather (LASP-2): one all_gather of every segment's (S_i, a_i), then each rank runs the prefix locally; the
  backward gathers (gE_i, a_i) once and runs the suffix locally. Launch and finish are separate autograd nodes so
  the local zero-state output is computed while the gather is in flight (and its backward while the gradient
  gather is in flight). Only the held segments' E_i and a_i are kept for backward (save_for_backward): nothing
  of size O(W) outlives the forward.
* allscan (ZeCO All-Scan): the state walks the chain of segment owners split into `blocks` blocks along K, each
  block sent (isend) as soon as it is updated so hops pipeline; backward walks the reverse chain.
* ring (LASP-1): the same chain with the whole state per hop and blocking send/recv.

Every node takes a join token and hands a token on (lsp.parallel.collectives): every rank runs every forward and
backward collective whenever grad mode is on, in one order, and a checkpoint recompute replays the result.
"""
from __future__ import annotations

import torch

from .collectives import replayed, replaying, token_like


def _decay(a_i, pass_i: float):
    # a_i: [B, H, Kg] or None -> A_i broadcastable to [B, H, K, V]
    if a_i is None:
        return float(pass_i)
    return pass_i * a_i.exp()[..., None]


def _decay_grad(gA_kv, A_i, a_i):
    # gA_kv: [B, H, K, V] = c G_{i+1} ⊙ E_i -> ∂a_i [B, H, Kg]
    if a_i is None:
        return None
    gA = gA_kv.sum(-1)
    if a_i.shape[-1] == 1:
        gA = gA.sum(-1, keepdim=True)
    return (gA * A_i[..., 0]).to(a_i.dtype)


def _held(sp) -> list[list[int]]:
    # per rank row: the global segments it holds, in local order
    return [sp.rank_segments(r) for r in sp.comm.ranks]


# ---------------------------------------------------------------------------------------------- all-gather


def prefix_states(S_all, a_all, sp, plan, upto: int):
    """E_0 .. E_upto from all segments' S, a (gathered [W, L, ...]). Returns a list of [B, H, K, V]."""
    E = []
    for i in range(upto + 1):
        if i == 0 or not plan.cont[i]:
            E.append(torch.zeros_like(S_all[0, 0]))
            continue
        pr, pl = sp.owner(i - 1)
        a_prev = None if a_all is None else a_all[pr, pl]
        E.append(_decay(a_prev, plan.passes[i - 1]) * E[i - 1] + S_all[pr, pl])
    return E


def suffix_grads(gE_all, E_held, a_all, sp, plan):
    """Reverse recurrence from the last segment down to the first held one: (∂S, ∂a) of every held segment.

    gE_all: [W, L, ...] direct gradients of every segment's E; E_held: {segment: E_i} of the held segments.
    """
    first = min(E_held)
    gS, ga = {}, {}
    G_next = None  # c_{i+1} G_{i+1}
    for i in reversed(range(first, sp.num_segments)):
        r, l = sp.owner(i)
        a_i = None if a_all is None else a_all[r, l]
        A_i = _decay(a_i, plan.passes[i])
        if i in E_held:
            gS[i] = torch.zeros_like(E_held[i]) if G_next is None else G_next
            ga[i] = None if a_i is None else (torch.zeros_like(a_i) if G_next is None
                                              else _decay_grad(G_next * E_held[i], A_i, a_i))
        G_i = gE_all[r, l] if G_next is None else gE_all[r, l] + A_i * G_next
        G_next = G_i if (i > 0 and plan.cont[i]) else None
    return gS, ga


def _pack(S, a):
    # S: [R, L, B, H, K, V]; a: [R, L, B, H, Kg] or None -> [R, n] one flat buffer (one collective)
    R = S.shape[0]
    parts = [S.reshape(R, -1)] + ([] if a is None else [a.to(S.dtype).reshape(R, -1)])
    return torch.cat(parts, dim=1)


def _unpack(buf, S_shape, a_shape, a_dtype):
    W = buf.shape[0]
    nS = 1
    for d in S_shape[1:]:
        nS *= d
    S = buf[:, :nS].reshape(W, *S_shape[1:])
    a = None if a_shape is None else buf[:, nS:].reshape(W, *a_shape[1:]).to(a_dtype)
    return S, a


class _Handle:
    """Carries an in-flight gather from the launch node to the finish node (forward) and back (backward). It holds
    a buffer only while a collective is in flight; what backward needs is in the nodes' saved tensors."""

    def __init__(self, sp, plan, tag, S, a):
        self.sp, self.plan, self.tag = sp, plan, tag
        self.S_shape, self.a_shape = S.shape, (None if a is None else a.shape)
        self.a_dtype = None if a is None else a.dtype
        self.buf = self.work = None
        self.bwd = None  # (gathered gradient buffer, work, E_held) between the two backward nodes

    def take(self):
        buf, self.buf = self.buf, None
        if self.work is not None:
            self.work.wait()
        self.work = None
        return buf


class GatherLaunch(torch.autograd.Function):
    # S: [R, L, B, H, K, V]; a: [R, L, B, H, Kg] or None; token: join token -> token (orders the finish node)
    @staticmethod
    def forward(ctx, S, a, token, h):
        ctx.h = h
        if not replaying():
            h.buf, h.work = h.sp.comm.all_gather(_pack(S, a), h.tag, async_op=True)
        return token_like(S)

    @staticmethod
    def backward(ctx, _):
        h = ctx.h
        buf, work, E_held = h.bwd
        h.bwd = None
        work.wait()
        sp = h.sp
        gE_all, a_all = _unpack(buf, h.S_shape, h.a_shape, h.a_dtype)
        held = _held(sp)
        E_map = {i: E_held[row, l] for row, segs in enumerate(held) for l, i in enumerate(segs)}
        gS, ga = suffix_grads(gE_all, E_map, a_all, sp, h.plan)
        gS_loc = torch.stack([torch.stack([gS[i] for i in segs]) for segs in held])
        ga_loc = None if a_all is None else torch.stack([torch.stack([ga[i] for i in segs]) for segs in held])
        return gS_loc, ga_loc, None, None


def _finish_prefix(h):
    # wait for the gathered (S, a) of every segment -> E of the held segments [R, L, B, H, K, V]
    sp = h.sp
    S_all, a_all = _unpack(h.take(), h.S_shape, h.a_shape, h.a_dtype)
    held = _held(sp)
    E = prefix_states(S_all, a_all, sp, h.plan, max(max(segs) for segs in held))
    return torch.stack([torch.stack([E[i] for i in segs]) for segs in held])


class GatherFinish(torch.autograd.Function):
    # token, a (own decays, kept for backward) -> E: [R, L, B, H, K, V] entering states of the held segments, token
    @staticmethod
    def forward(ctx, token, a, h):
        ctx.set_materialize_grads(False)
        ctx.h = h
        E = replayed(lambda: _finish_prefix(h))
        ctx.save_for_backward(E, a)
        return E, token_like(E)

    @staticmethod
    def backward(ctx, gE, _):
        E, a = ctx.saved_tensors
        h = ctx.h
        gE = torch.zeros_like(E) if gE is None else gE.contiguous()
        buf, work = h.sp.comm.all_gather(_pack(gE, a), h.tag + ":bwd", async_op=True)
        h.bwd = (buf, work, E)
        return E.new_empty(0), None, None


# ---------------------------------------------------------------------------------------------- chain
def _blocks(K: int, nb: int) -> list[slice]:
    size = -(-K // max(1, min(nb, K)))
    return [slice(s, min(s + size, K)) for s in range(0, K, size)]


def _kslice(A, blk):
    return A[..., blk, :] if isinstance(A, torch.Tensor) and A.shape[-2] > 1 else A


def _relay(comm, blks, recvs, incoming, update, me, send_to, tag, pipelined, pending):
    """One chain hop, block by block along K: wait for the block of the incoming state (written into `incoming`),
    compute the outgoing block `update(b)`, send it on at once (isend when pipelined). Returns the outgoing state."""
    out = torch.empty_like(incoming)
    for j, b in enumerate(blks):
        if recvs is not None:
            work, buf = recvs[j]
            if work is not None:
                work.wait()
            incoming[..., b, :] = buf
        out[..., b, :] = update(b)
        if send_to is not None:
            pending.append(comm.send(out[..., b, :].contiguous(), me, send_to, tag, async_op=pipelined)[0])
    return out


def _chain_forward(S, a, sp, plan, nb, pipelined, tag):
    # S: [R, L, B, H, K, V]; a: [R, L, B, H, Kg] or None -> E: [R, L, B, H, K, V]
    comm, n = sp.comm, sp.num_segments
    blks = _blocks(S.shape[-2], nb)
    E = torch.zeros_like(S)
    out, pending = {}, []
    for i in range(n):
        r, l = sp.owner(i)
        if r not in comm.ranks:
            continue
        row = comm.row(r)
        A_i = _decay(None if a is None else a[row, l], plan.passes[i])
        prev = sp.owner(i - 1)[0] if i > 0 else None
        nxt = sp.owner(i + 1)[0] if i + 1 < n else None
        send_to = nxt if (nxt is not None and plan.cont[i + 1] and nxt != r) else None
        if i > 0 and plan.cont[i] and prev == r:
            E[row, l] = out[i - 1]
        recvs = None
        if i > 0 and plan.cont[i] and prev != r:
            recvs = [comm.recv(E[row, l][..., b, :], prev, r, tag, async_op=pipelined) for b in blks]
        E_i, S_i = E[row, l], S[row, l]
        out[i] = _relay(comm, blks, recvs, E_i, lambda b: _kslice(A_i, b) * E_i[..., b, :] + S_i[..., b, :],
                        r, send_to, tag, pipelined, pending)
    for work in pending:
        if work is not None:
            work.wait()
    return E


class ChainExchange(torch.autograd.Function):
    """Entering states by passing the state along the chain of segment owners (ring / All-Scan)."""

    @staticmethod
    def forward(ctx, S, a, token, sp, plan, nb, pipelined, tag):
        # S: [R, L, B, H, K, V]; a: [R, L, B, H, Kg] or None -> E: [R, L, B, H, K, V], token
        ctx.set_materialize_grads(False)
        E = replayed(lambda: _chain_forward(S, a, sp, plan, nb, pipelined, tag))
        ctx.save_for_backward(E, a)
        ctx.sp, ctx.plan, ctx.nb, ctx.pipelined, ctx.tag = sp, plan, nb, pipelined, tag
        return E, token_like(E)

    @staticmethod
    def backward(ctx, gE, _):
        E, a = ctx.saved_tensors
        gE = torch.zeros_like(E) if gE is None else gE
        sp, plan, tag = ctx.sp, ctx.plan, ctx.tag + ":bwd"
        comm, n = sp.comm, sp.num_segments
        blks = _blocks(E.shape[-2], ctx.nb)
        gS, ga = torch.zeros_like(E), (None if a is None else torch.zeros_like(a))
        G_out, pending = {}, []  # G_out[i] = G_i, handed to segment i-1 when c_i = 1
        for i in reversed(range(n)):
            r, l = sp.owner(i)
            if r not in comm.ranks:
                continue
            row = comm.row(r)
            a_i = None if a is None else a[row, l]
            A_i = _decay(a_i, plan.passes[i])
            prev = sp.owner(i - 1)[0] if i > 0 else None
            nxt = sp.owner(i + 1)[0] if i + 1 < n else None
            has_next = nxt is not None and plan.cont[i + 1]
            send_to = prev if (i > 0 and plan.cont[i] and prev != r) else None
            recvs = None
            if has_next and nxt != r:
                recvs = [comm.recv(gS[row, l][..., b, :], nxt, r, tag, async_op=ctx.pipelined) for b in blks]
            elif has_next:
                gS[row, l] = G_out[i + 1]
            gS_i, gE_i = gS[row, l], gE[row, l]
            G_out[i] = _relay(comm, blks, recvs, gS_i, lambda b: gE_i[..., b, :] + _kslice(A_i, b) * gS_i[..., b, :],
                              r, send_to, tag, ctx.pipelined, pending)
            if a_i is not None:
                ga[row, l] = _decay_grad(gS_i * E[row, l], A_i, a_i)
        for work in pending:
            if work is not None:
                work.wait()
        return gS, ga, None, None, None, None, None, None


def exchange(S, a, token, sp, plan, method: str, scan_blocks: int):
    """Start the exchange; returns a function that finishes it and yields (E [R, L, B, H, K, V], token).

    S: [R, L, B, H, K, V] local states; a: [R, L, B, H, Kg] total log-decays or None; token: a join token.
    """
    if method == "allgather":
        h = _Handle(sp, plan, "allgather", S, a)
        launched = GatherLaunch.apply(S, a, token, h)
        return lambda: GatherFinish.apply(launched, a, h)
    if method == "allscan":
        out = ChainExchange.apply(S, a, token, sp, plan, scan_blocks, True, "allscan")
    else:
        out = ChainExchange.apply(S, a, token, sp, plan, 1, False, "ring")
    return lambda: out
