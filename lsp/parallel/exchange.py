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

import concurrent.futures

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


class _GatherHandle:
    """allgather: carries the in-flight gather from the launch node to the finish node (forward) and back
    (backward). It holds a buffer only while a collective is in flight; what backward needs is in the nodes' saved
    tensors."""

    def __init__(self, sp, plan, tag, S, a):
        self.sp, self.plan, self.tag = sp, plan, tag
        self.S_shape, self.a_shape = S.shape, (None if a is None else a.shape)
        self.a_dtype = None if a is None else a.dtype
        self.buf = self.work = None
        self.bwd = None  # (gathered gradient buffer, work, E_held) between the two backward nodes

    def launch(self, S, a):
        # S: [R, L, B, H, K, V]; a: [R, L, B, H, Kg] or None
        self.buf, self.work = self.sp.comm.all_gather(_pack(S, a), self.tag, async_op=True)

    def finish(self):
        # wait for the gathered (S, a) of every segment -> E of the held segments [R, L, B, H, K, V]
        buf, self.buf, work, self.work = self.buf, None, self.work, None
        if work is not None:
            work.wait()
        S_all, a_all = _unpack(buf, self.S_shape, self.a_shape, self.a_dtype)
        held = _held(self.sp)
        E = prefix_states(S_all, a_all, self.sp, self.plan, max(max(segs) for segs in held))
        return torch.stack([torch.stack([E[i] for i in segs]) for segs in held])

    def launch_backward(self, gE, E, a):
        buf, work = self.sp.comm.all_gather(_pack(gE, a), self.tag + ":bwd", async_op=True)
        self.bwd = (buf, work, E)

    def input_grads(self):
        # -> gradients of the launch's S, a
        buf, work, E_held = self.bwd
        self.bwd = None
        work.wait()
        sp = self.sp
        gE_all, a_all = _unpack(buf, self.S_shape, self.a_shape, self.a_dtype)
        held = _held(sp)
        E_map = {i: E_held[row, l] for row, segs in enumerate(held) for l, i in enumerate(segs)}
        gS, ga = suffix_grads(gE_all, E_map, a_all, sp, self.plan)
        gS_loc = torch.stack([torch.stack([gS[i] for i in segs]) for segs in held])
        ga_loc = None if a_all is None else torch.stack([torch.stack([ga[i] for i in segs]) for segs in held])
        return gS_loc, ga_loc


# ---------------------------------------------------------------------------------------------- chain
#
# Both directions of a chain are one linear recurrence along a traversal order of the segments:
#
#     X_first = 0,        X_next = c · (A_i ⊙ X_i + Y_i)
#
# forward:  order 0 .. n-1, Y_i = S_i,  c = c_{i+1}, X_i = E_i
# backward: order n-1 .. 0, Y_i = gE_i, c = c_i,     X_i = c_{i+1} G_{i+1} (= ∂S_i)
#
# All-Scan cuts the traversal into runs wherever two consecutive segments sit on the same rank (zigzag: at the
# turn in the middle). Run 0 carries X itself; run 1 carries the affine partial (P, D) with X_i = D_i ⊙ X_start
# + P_i (P from X_start = 0, D the product of the c·A since the run's start), so both runs walk their rank chains
# at the same time; then X_start, known where run 0 ends, reaches every rank by a binomial-tree broadcast:
# W - 1 + ceil(log2 W) dependent hops instead of 2W - 2. The ring (LASP-1 baseline) walks one run, blocking.
# On real ranks the walk runs on a helper thread, so it overlaps the local output (forward) and its gradient
# (backward); in emulation, and for the ring, it runs inline.


def split_blocks(D: int, nb: int) -> list[slice]:
    """nb (at most D) slices that cover range(D) in equal blocks (the last may be shorter): the pipeline blocks."""
    size = -(-D // max(1, min(nb, D)))
    return [slice(s, min(s + size, D)) for s in range(0, D, size)]


def _kslice(A, blk):
    return A[..., blk, :] if isinstance(A, torch.Tensor) and A.shape[-2] > 1 else A


def traversal(n: int, forward: bool) -> list[int]:
    return list(range(n)) if forward else list(range(n - 1, -1, -1))


def chain_runs(sp, forward: bool, split: bool) -> list[list[int]]:
    """The traversal cut into runs at every same-rank step (split, All-Scan), or one run (the ring)."""
    runs = []
    for i in traversal(sp.num_segments, forward):
        if runs and not (split and sp.owner(runs[-1][-1])[0] == sp.owner(i)[0]):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def tree_rounds(W: int, root: int) -> list[list[tuple[int, int]]]:
    """Binomial-tree broadcast from `root`: per round, the (src, dst) rank pairs (ceil(log2 W) rounds)."""
    rounds, span = [], 1
    while span < W:
        rounds.append([((root + r) % W, (root + r + span) % W) for r in range(span) if r + span < W])
        span *= 2
    return rounds


def chain_hop_depth(sp, plan, forward: bool, split: bool) -> int:
    """Longest chain of dependent messages of one scan (the latency in hops): each message depends on the one that
    brought its input; broadcast messages depend on the end of run 0 and on their tree parent."""
    runs, depth = chain_runs(sp, forward, split), 0
    edge = _edge(plan, sp.num_segments, forward)
    for run in runs:
        d = 0
        for prev, i in zip(run, run[1:]):
            if sp.owner(prev)[0] != sp.owner(i)[0] and edge(prev):
                d += 1
            depth = max(depth, d)
    if len(runs) > 1:
        end = 0
        for prev, i in zip(runs[0], runs[0][1:]):
            end += sp.owner(prev)[0] != sp.owner(i)[0] and bool(edge(prev))
        depth = max(depth, end + len(tree_rounds(sp.world_size, sp.owner(runs[0][-1])[0])))
    return depth


def _edge(plan, n: int, forward: bool):
    # c of the edge from segment i to the next one in traversal order (0 past the end)
    if forward:
        return lambda i: plan.cont[i + 1] if i + 1 < n else 0
    return lambda i: plan.cont[i] if i > 0 else 0


class _Walker:
    """One scan over this process's rank rows (see the comment above): X of every held segment, [R, L, ...]."""

    def __init__(self, sp, plan, forward: bool, split: bool, nb: int, pipelined: bool, tag: str):
        self.sp, self.plan, self.nb, self.pipelined, self.tag = sp, plan, nb, pipelined, tag
        self.runs = chain_runs(sp, forward, split)
        assert len(self.runs) <= 2, "a traversal turns at most once (contiguous or zigzag layout)"
        self.edge = _edge(plan, sp.num_segments, forward)

    def run(self, Y, a):
        # Y: [R, L, B, H, K, V] (S forward, gE backward); a: [R, L, B, H, Kg] or None -> X: [R, L, B, H, K, V]
        self.blks, self.pending = split_blocks(Y.shape[-2], self.nb), []
        self.d_shape = (*Y.shape[2:4], 1 if a is None else a.shape[-1], 1)
        X = torch.zeros_like(Y)
        outs, D = {}, {}  # segment -> outgoing X (or P) and, in run 1, its D and outgoing D
        for k, pos, i in self._steps():
            self._step(k, pos, i, X, Y, a, outs, D)
        if len(self.runs) > 1:
            self._broadcast_and_resolve(X, outs, D)
        for work in self.pending:
            if work is not None:
                work.wait()
        return X

    def _steps(self):
        # held (run, position, segment), in the order this process handles them: emulated ranks in traversal
        # order (every send before its receive); a real rank by position, so each run waits only for its own
        # predecessor and the two runs walk at the same time
        held = {i for r in self.sp.comm.ranks for i in self.sp.rank_segments(r)}
        steps = [(k, p, i) for k, run in enumerate(self.runs) for p, i in enumerate(run) if i in held]
        return steps if self.sp.emulated else sorted(steps, key=lambda s: (s[1], s[0]))

    def _decay_of(self, a, row, l, i, like):
        # A_i as [B, H, Kg, 1]: p_i · exp(a_i), or p_i without decay
        if a is None:
            return like.new_full(self.d_shape, float(self.plan.passes[i]))
        return _decay(a[row, l], self.plan.passes[i])

    def _step(self, k, pos, i, X, Y, a, outs, D):
        sp, comm, run = self.sp, self.sp.comm, self.runs[k]
        me, l = sp.owner(i)
        row = comm.row(me)
        X_i, Y_i = X[row, l], Y[row, l]
        A_i = self._decay_of(a, row, l, i, Y_i)
        prev = run[pos - 1] if pos > 0 else None
        nxt = run[pos + 1] if pos + 1 < len(run) else None
        c_out = float(self.edge(i))
        send_to = sp.owner(nxt)[0] if nxt is not None and c_out and sp.owner(nxt)[0] != me else None
        linked = prev is not None and self.edge(prev)
        remote = linked and sp.owner(prev)[0] != me
        if k == 1:  # the partial's multiplier: 1 at the run start, the predecessor's c·A·D, 0 across a cut edge
            if remote:
                D_i = comm.recv(Y_i.new_empty(self.d_shape), sp.owner(prev)[0], me, self.tag + "/decay")[1]
            else:
                D_i = D[("out", prev)] if linked else Y_i.new_full(self.d_shape, 1.0 if prev is None else 0.0)
            D[i], D[("out", i)] = D_i, c_out * A_i * D_i
            if send_to is not None:
                self.pending.append(comm.send(D[("out", i)], me, send_to, self.tag + "/decay",
                                              async_op=self.pipelined)[0])
        recvs = None
        if remote:
            recvs = [comm.recv(X_i[..., b, :], sp.owner(prev)[0], me, self.tag, async_op=self.pipelined)
                     for b in self.blks]
        elif linked:
            X_i.copy_(outs[prev])
        outs[i] = self._relay(recvs, X_i, lambda b: c_out * (_kslice(A_i, b) * X_i[..., b, :] + Y_i[..., b, :]),
                              me, send_to)

    def _relay(self, recvs, incoming, update, me, send_to):
        """Block by block along K: wait for the block of the incoming X (written into `incoming`), compute the
        outgoing block `update(b)`, send it on at once (isend when pipelined). Returns the outgoing X."""
        out = torch.empty_like(incoming)
        for j, b in enumerate(self.blks):
            if recvs is not None:
                work, buf = recvs[j]
                if work is not None:
                    work.wait()
                incoming[..., b, :] = buf
            out[..., b, :] = update(b)
            if send_to is not None:
                self.pending.append(self.sp.comm.send(out[..., b, :].contiguous(), me, send_to, self.tag,
                                                      async_op=self.pipelined)[0])
        return out

    def _broadcast_and_resolve(self, X, outs, D):
        # X_start of run 1 leaves run 0's last segment, goes down a binomial tree, and X_i = D_i ⊙ X_start + P_i
        sp, comm = self.sp, self.sp.comm
        junction = self.runs[0][-1]
        root = sp.owner(junction)[0]
        start = {root: outs[junction]} if root in comm.ranks else {}
        for pairs in tree_rounds(sp.world_size, root):
            for src, dst in pairs:
                if src in comm.ranks:
                    self.pending.append(comm.send(start[src], src, dst, self.tag + "/bcast",
                                                  async_op=self.pipelined)[0])
            for src, dst in pairs:
                if dst in comm.ranks:
                    start[dst] = comm.recv(X[0, 0], src, dst, self.tag + "/bcast")[1]
        held = {i for r in comm.ranks for i in sp.rank_segments(r)}
        for i in self.runs[1]:
            if i in held:
                r, l = sp.owner(i)
                X[comm.row(r), l] += D[i] * start[r]


class _Inline:
    """The result of a walk run in the calling thread (emulation: every virtual rank is here)."""

    def __init__(self, fn):
        self._value = fn()

    def result(self):
        return self._value


_POOL = None


def _walk(sp, fn, overlap: bool):
    # real ranks, overlap (All-Scan): a helper thread, so the walk overlaps the local work; else inline (the ring
    # is the LASP-1 baseline: blocking, on the compute stream)
    global _POOL
    if sp.emulated or not overlap:
        return _Inline(fn)
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsp-chain")

    def run():
        with torch.no_grad():
            return fn()

    return _POOL.submit(run)


class _ChainHandle:
    """ring / allscan: the same four steps as `_GatherHandle`, with the walks of the chain (on the helper thread
    when they overlap the local work)."""

    def __init__(self, sp, plan, method, nb):
        self.sp, self.plan = sp, plan
        split, pipelined = method == "allscan", method == "allscan"
        self.walker = lambda fwd, tag: _Walker(sp, plan, fwd, split, nb if pipelined else 1, pipelined, tag)
        self.tag, self.overlap, self.fwd, self.bwd = method, pipelined, None, None

    def launch(self, S, a):
        S_, a_ = S.detach(), (None if a is None else a.detach())
        self.fwd = _walk(self.sp, lambda: self.walker(True, self.tag).run(S_, a_), self.overlap)

    def finish(self):
        E, self.fwd = self.fwd.result(), None
        return E

    def launch_backward(self, gE, E, a):
        gE, a_ = gE.detach(), (None if a is None else a.detach())
        self.bwd = (_walk(self.sp, lambda: self.walker(False, self.tag + ":bwd").run(gE, a_), self.overlap), E, a)

    def input_grads(self):
        future, E, a = self.bwd
        self.bwd = None
        gS = future.result()  # X_i = c_{i+1} G_{i+1} = ∂S_i
        ga = None
        if a is not None:
            sp = self.sp
            ga = torch.zeros_like(a)
            for r in sp.comm.ranks:
                for l, i in enumerate(sp.rank_segments(r)):
                    row = sp.comm.row(r)
                    ga[row, l] = _decay_grad(gS[row, l] * E[row, l], _decay(a[row, l], self.plan.passes[i]),
                                             a[row, l])
        return gS, ga


# ---------------------------------------------------------------------------------------------- the two nodes

class Launch(torch.autograd.Function):
    # S: [R, L, B, H, K, V]; a: [R, L, B, H, Kg] or None; token: join token -> token (orders the finish node);
    # h: the method's handle. A checkpoint recompute launches nothing: Finish replays the recorded result.
    @staticmethod
    def forward(ctx, S, a, token, h):
        ctx.h = h
        if not replaying():
            h.launch(S, a)
        return token_like(S)

    @staticmethod
    def backward(ctx, _):
        return (*ctx.h.input_grads(), None, None)


class Finish(torch.autograd.Function):
    # token, a (kept for backward) -> E: [R, L, B, H, K, V] entering states of the held segments, token. Only the
    # held segments' E and a are saved; backward starts the reverse exchange, Launch's backward finishes it.
    @staticmethod
    def forward(ctx, token, a, h):
        ctx.set_materialize_grads(False)
        ctx.h = h
        E = replayed(h.finish)
        ctx.save_for_backward(E, a)
        return E, token_like(E)

    @staticmethod
    def backward(ctx, gE, _):
        E, a = ctx.saved_tensors
        ctx.h.launch_backward(torch.zeros_like(E) if gE is None else gE.contiguous(), E, a)
        return E.new_empty(0), None, None


def exchange(S, a, token, sp, plan, method: str, scan_blocks: int):
    """Start the exchange; returns a function that finishes it and yields (E [R, L, B, H, K, V], token).

    S: [R, L, B, H, K, V] local states; a: [R, L, B, H, Kg] total log-decays or None; token: a join token.
    """
    h = _GatherHandle(sp, plan, method, S, a) if method == "allgather" else _ChainHandle(sp, plan, method,
                                                                                          scan_blocks)
    launched = Launch.apply(S, a, token, h)
    return lambda: Finish.apply(launched, a, h)
