"""The chain methods: ZeCO All-Scan and the LASP-1 ring, written once over the algebra of lsp.parallel.affine.

Both directions of a chain are one affine recurrence along a traversal order of the segments:

    X_first = 0,        X_next = c · (A_i X_i + Y_i)

    forward:  order 0 .. n-1, Y_i = S_i,  c = c_{i+1}, X_i = E_i,   A_i as is
    backward: order n-1 .. 0, Y_i = gE_i, c = c_i,     X_i = c_{i+1} G_{i+1} (= ∂S_i),   A_iᵀ

The state travels in blocks along V: every map acts on K only, so the V columns of X are independent and a block can
be sent on as soon as it is updated (All-Scan pipelines the hops this way; the ring sends the whole state, blocking).

All-Scan cuts the traversal into runs wherever two consecutive segments sit on the same rank (zigzag: at the turn
in the middle). Run 0 carries X itself; run 1 carries the affine partial (P, D) with X_i = D_i X_start + P_i (P from
X_start = 0, D the composed product of the c·A since the run's start, sent as the family's map: a vector for a decay,
K × K for a dense map), so both runs walk their rank chains at the same time; then X_start, known where run 0 ends,
reaches every rank by a binomial-tree broadcast: W - 1 + ceil(log2 W) dependent hops instead of 2W - 2. On real
ranks All-Scan's walk runs on a helper thread, so it overlaps the local output (forward) and its gradient
(backward); in emulation, and for the ring, it runs inline.
"""
from __future__ import annotations

import concurrent.futures
import math

import torch
from torch.utils import _python_dispatch

from . import register_method


def split_blocks(D: int, nb: int) -> list[slice]:
    """nb (at most D) slices that cover range(D) in equal blocks (the last may be shorter): the pipeline blocks."""
    size = -(-D // max(1, min(nb, D)))
    return [slice(s, min(s + size, D)) for s in range(0, D, size)]


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
    """One scan over this process's rank rows (see the module docstring): X of every held segment, [R, L, ...]."""

    def __init__(self, sp, plan, family, forward: bool, split: bool, nb: int, pipelined: bool, tag: str):
        self.sp, self.plan, self.family, self.nb, self.pipelined, self.tag = sp, plan, family, nb, pipelined, tag
        self.forward = forward
        self.runs = chain_runs(sp, forward, split)
        assert len(self.runs) <= 2, "a traversal turns at most once (contiguous or zigzag layout)"
        self.edge = _edge(plan, sp.num_segments, forward)

    def run(self, Y, P):
        # Y: [R, L, B, H, K, V] (S forward, gE backward); P: the family's maps [R, L, B, H, ...] or None
        # -> X: [R, L, B, H, K, V]
        self.blks, self.pending = split_blocks(Y.shape[-1], self.nb), []
        X = torch.zeros_like(Y)
        outs, D = {}, {}  # segment -> outgoing X (or P) and, in run 1, its D and outgoing D
        for k, pos, i in self._steps():
            self._step(k, pos, i, X, Y, P, outs, D)
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

    def _step(self, k, pos, i, X, Y, P, outs, D):
        sp, comm, run, fam = self.sp, self.sp.comm, self.runs[k], self.family
        me, l = sp.owner(i)
        row = comm.row(me)
        X_i, Y_i = X[row, l], Y[row, l]
        P_i = None if P is None else P[row, l]
        A_i = fam.map(P_i, self.plan.passes[i], Y_i)
        prev = run[pos - 1] if pos > 0 else None
        nxt = run[pos + 1] if pos + 1 < len(run) else None
        c_out = float(self.edge(i))
        send_to = sp.owner(nxt)[0] if nxt is not None and c_out and sp.owner(nxt)[0] != me else None
        linked = prev is not None and self.edge(prev)
        remote = linked and sp.owner(prev)[0] != me
        if k == 1:  # the partial's map: identity at the run start, the predecessor's c·A·D, 0 across a cut edge
            one = fam.identity(P_i, Y_i)
            if remote:
                D_i = comm.recv(torch.empty_like(one), sp.owner(prev)[0], me, self.tag + "/decay")[1]
            else:
                D_i = D[("out", prev)] if linked else (one if prev is None else torch.zeros_like(one))
            D[i], D[("out", i)] = D_i, c_out * fam.apply(A_i, D_i, transpose=not self.forward)
            if send_to is not None:
                self.pending.append(comm.send(D[("out", i)].contiguous(), me, send_to, self.tag + "/decay",
                                              async_op=self.pipelined)[0])
        recvs = None
        if remote:
            recvs = [comm.recv(X_i[..., b], sp.owner(prev)[0], me, self.tag, async_op=self.pipelined)
                     for b in self.blks]
        elif linked:
            X_i.copy_(outs[prev])
        update = lambda b: c_out * (fam.apply(A_i, X_i[..., b], transpose=not self.forward) + Y_i[..., b])  # noqa: E731
        outs[i] = self._relay(recvs, X_i, update, me, send_to)

    def _relay(self, recvs, incoming, update, me, send_to):
        """Block by block along V: wait for the block of the incoming X (written into `incoming`), compute the
        outgoing block `update(b)`, send it on at once (isend when pipelined). Returns the outgoing X."""
        out = torch.empty_like(incoming)
        for j, b in enumerate(self.blks):
            if recvs is not None:
                work, buf = recvs[j]
                if work is not None:
                    work.wait()
                incoming[..., b] = buf
            out[..., b] = update(b)
            if send_to is not None:
                self.pending.append(self.sp.comm.send(out[..., b].contiguous(), me, send_to, self.tag,
                                                      async_op=self.pipelined)[0])
        return out

    def _broadcast_and_resolve(self, X, outs, D):
        # X_start of run 1 leaves run 0's last segment, goes down a binomial tree, and X_i = D_i X_start + P_i
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
                X[comm.row(r), l] += self.family.apply(D[i], start[r])   # D_i is already the (transposed) product


class _Inline:
    """The result of a walk run in the calling thread (emulation: every virtual rank is here)."""

    def __init__(self, fn):
        self._value = fn()

    def result(self):
        return self._value


_POOL = None


def _walk(sp, fn, overlap: bool):
    # real ranks, overlap (All-Scan): a helper thread, so the walk overlaps the local work; else inline (the ring
    # is the LASP-1 baseline: blocking, on the compute stream). Torch dispatch modes (FakeTensorMode, the counters
    # of `lsp plan --measure`) are thread-local and FakeTensorMode is not thread-safe: under one, inline too, so
    # the walk runs on fake tensors and is counted
    global _POOL
    if sp.emulated or not overlap or _python_dispatch._get_current_dispatch_mode() is not None:
        return _Inline(fn)
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsp-chain")

    def run():
        with torch.no_grad():
            return fn()

    return _POOL.submit(run)


class ChainHandle:
    """ring / allscan: the four steps of a method handle (lsp.parallel.methods) with the walks of the chain (on the
    helper thread when they overlap the local work)."""

    split = pipelined = False

    def __init__(self, sp, plan, family, tag, scan_blocks):
        self.sp, self.plan, self.family, self.tag = sp, plan, family, tag
        self.nb = scan_blocks if self.pipelined else 1
        self.fwd = self.bwd = None

    def walker(self, forward: bool, tag: str) -> _Walker:
        return _Walker(self.sp, self.plan, self.family, forward, self.split, self.nb, self.pipelined, tag)

    def launch(self, S, P):
        S_, P_ = S.detach(), (None if P is None else P.detach())
        self.fwd = _walk(self.sp, lambda: self.walker(True, self.tag).run(S_, P_), self.pipelined)

    def finish(self):
        E, self.fwd = self.fwd.result(), None
        return E

    def launch_backward(self, gE, E, P):
        gE, P_ = gE.detach(), (None if P is None else P.detach())
        self.bwd = (_walk(self.sp, lambda: self.walker(False, self.tag + ":bwd").run(gE, P_), self.pipelined), E, P)

    def input_grads(self):
        (future, E, P), self.bwd = self.bwd, None
        gS = future.result()  # X_i = c_{i+1} G_{i+1} = ∂S_i
        if P is None:
            return gS, None
        sp, fam, gP = self.sp, self.family, torch.zeros_like(P)
        for r in sp.comm.ranks:
            row = sp.comm.row(r)
            for l, i in enumerate(sp.rank_segments(r)):
                p_i = self.plan.passes[i]
                gP[row, l] = fam.grad(P[row, l], fam.map(P[row, l], p_i, E[row, l]), gS[row, l], E[row, l], p_i)
        return gS, gP


class AllScanHandle(ChainHandle):
    split = pipelined = True


def ring_cost(W: int, s: float, m: float, t_overlap: float, hw, layout: str, scan_blocks=None):
    """LASP-1: (W-1)·L dependent hops, each receiving, updating and sending the state, blocking, nothing overlaps:
    (W-1)·L·(α + s/β + 3·s/HBM + γ); bytes (W-1)·L·s/W."""
    if W == 1:
        return 0.0, 0.0
    L = 2 if layout == "zigzag" else 1
    hop = hw.latency + s / hw.bandwidth + 3 * s / hw.hbm + hw.hop_overhead
    return (W - 1) * L * hop, (W - 1) * L * s / W


def allscan_cost(W: int, s: float, m: float, t_overlap: float, hw, layout: str, scan_blocks=None):
    """ZeCO All-Scan, n_b blocks along V overlapped with the local work: contiguous, the chain pipelined,
    (W + n_b - 2)·(α + s/(n_b·β)), bytes (W-1)·s/W; zigzag, both half chains at once, the second sending its
    composed map first ((W-1)·α more), then a tree broadcast of the midpoint state, ⌈log2 W⌉·(α + s/β); bytes
    (W-1)·(3s + m)/W. scan_blocks None: the best n_b."""
    if W == 1:
        return 0.0, 0.0
    if scan_blocks is None:
        scan_blocks = ALLSCAN.best_blocks(W, s, m, t_overlap, hw, layout)
    chain = (W + scan_blocks - 2) * (hw.latency + s / (scan_blocks * hw.bandwidth))
    if layout != "zigzag":
        return max(0.0, chain - t_overlap), (W - 1) * s / W
    tree = math.ceil(math.log2(W)) * (hw.latency + s / hw.bandwidth)
    return max(0.0, chain + (W - 1) * hw.latency + tree - t_overlap), (W - 1) * (3 * s + m) / W


register_method("ring", handle=ChainHandle, cost=ring_cost, label="LASP-1 (ring)")
ALLSCAN = register_method("allscan", handle=AllScanHandle, cost=allscan_cost, label="ZeCO All-Scan", blocks=True)

__all__ = ["ChainHandle", "AllScanHandle", "ring_cost", "allscan_cost", "chain_hop_depth", "chain_runs",
           "tree_rounds", "split_blocks"]
