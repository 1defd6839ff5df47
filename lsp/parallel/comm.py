"""The one comm layer every sequence-parallel collective goes through, with call and byte accounting.

Two backends with the same interface, so the SP algorithms are written once:

* `DistComm`: real ranks over a torch.distributed group (gloo on CPU, NCCL on GPU). Tensors carry a leading rank
  axis of size R = 1 (this rank's row).
* `EmuComm`: W virtual ranks in one process; tensors carry a leading rank axis of size R = W. Collectives are
  in-memory reindexing; send/recv go through a mailbox. Bytes are counted as if the ranks were real.

Counting: every call records, per virtual or real rank, the bytes it sends and receives (all_gather of n bytes per
rank: receives (W-1)·n; ring all_reduce of n bytes: sends and receives 2(W-1)/W·n; reduce_scatter of W slots of
n bytes: sends and receives (W-1)·n; ring_shift of n bytes: sends n to the next rank and receives n from the
previous). `comm_stats()` sums the records of this process by op, by method tag and by rank.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist

_STATS: dict[tuple[str, str, int], list[int]] = defaultdict(lambda: [0, 0, 0])  # (tag, op, rank) -> calls, sent, recv


def record(op: str, tag: str, rank: int, sent: int, recv: int) -> None:
    entry = _STATS[(tag, op, rank)]
    entry[0] += 1
    entry[1] += int(sent)
    entry[2] += int(recv)


def comm_stats() -> dict:
    """Counted communication of this process since the last reset.

    Returns {"total": c, "ops": {op: c}, "tags": {tag: c}, "ranks": {rank: c}, "by_tag_op": {"tag/op": c}} with
    c = {"calls", "bytes_sent", "bytes_recv"}. In emulation every virtual rank is counted under its own rank id;
    with real ranks this process only sees its own rank.
    """
    out = {"total": _zero(), "ops": {}, "tags": {}, "ranks": {}, "by_tag_op": {}}
    for (tag, op, rank), (calls, sent, recv) in _STATS.items():
        for bucket in (out["total"], out["ops"].setdefault(op, _zero()), out["tags"].setdefault(tag, _zero()),
                       out["ranks"].setdefault(rank, _zero()), out["by_tag_op"].setdefault(f"{tag}/{op}", _zero())):
            bucket["calls"] += calls
            bucket["bytes_sent"] += sent
            bucket["bytes_recv"] += recv
    return out


def reset_comm_stats() -> None:
    _STATS.clear()


def _zero() -> dict:
    return {"calls": 0, "bytes_sent": 0, "bytes_recv": 0}


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


class DistComm:
    """Collectives of this rank over a torch.distributed group; rank-axis tensors are [1, ...]."""

    emulated = False

    def __init__(self, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranks = [self.rank]
        # NCCL reduce-scatters (half an all_reduce's bytes); gloo keeps all_reduce + own slot (tests may flip this)
        self.native_reduce_scatter = dist.get_backend(group) != "gloo"

    def row(self, rank: int) -> int:
        return 0

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def all_gather(self, x: torch.Tensor, tag: str, async_op: bool = False):
        """x: [1, *S] -> [W, *S] (every rank's row). With async_op returns (buffer, work); call work.wait()."""
        x = x.contiguous()
        W = self.world_size
        out = x.new_empty(W * x.shape[0], *x.shape[1:])
        record("all_gather", tag, self.rank, _nbytes(x) * (W - 1), _nbytes(x) * (W - 1))
        work = dist.all_gather_into_tensor(out, x, group=self.group, async_op=True) if _has_agit() else None
        if work is None:
            chunks = list(out.chunk(W))
            work = dist.all_gather(chunks, x, group=self.group, async_op=True)
        if async_op:
            return out, work
        work.wait()
        return out

    def all_reduce(self, x: torch.Tensor, tag: str) -> torch.Tensor:
        """Sum over ranks (a new tensor). x: [1, *S]."""
        x = x.contiguous().clone()
        W = self.world_size
        moved = 2 * (W - 1) * _nbytes(x) // W
        record("all_reduce", tag, self.rank, moved, moved)
        dist.all_reduce(x, group=self.group)
        return x

    def reduce_scatter(self, x: torch.Tensor, tag: str) -> torch.Tensor:
        """Slot `rank` of the sum over ranks: x [1, W, *S] (this rank's contribution to every slot) -> [1, *S].

        NCCL: one reduce_scatter ((W-1)/W of the buffer each way, half an all_reduce); gloo: all_reduce of the
        buffer, then this rank's slot (counted as the all_reduce it is).
        """
        x = x.contiguous()
        if not self.native_reduce_scatter:
            return self.all_reduce(x, tag)[:, self.rank]
        W = self.world_size
        slot = _nbytes(x) // W
        record("reduce_scatter", tag, self.rank, slot * (W - 1), slot * (W - 1))
        out = x.new_empty(x.shape[2:])
        _reduce_scatter_fn()(out.view(-1), x.view(-1), group=self.group)     # flat: gloo accepts only this form
        return out.unsqueeze(0)

    def all_to_all(self, x: torch.Tensor, send: list, recv: list, tag: str) -> torch.Tensor:
        """Rows of x [n, *S] to every rank: send[0][d] rows (in order) to rank d; returns the rows received,
        recv[0][s] from rank s, in rank order. send / recv: [1][W] ints (this rank's row of the split matrices)."""
        x = x.contiguous()
        row = x.element_size() * math.prod(x.shape[1:])
        me = self.rank
        record("all_to_all", tag, me, (sum(send[0]) - send[0][me]) * row, (sum(recv[0]) - recv[0][me]) * row)
        out = x.new_empty(sum(recv[0]), *x.shape[1:])
        dist.all_to_all_single(out, x, recv[0], send[0], group=self.group)
        return out

    def send(self, x: torch.Tensor, src: int, dst: int, tag: str, async_op: bool = False):
        x = x.contiguous()
        record("send", tag, src, _nbytes(x), 0)
        if async_op:
            return dist.isend(x, self._global(dst), group=self.group), x
        dist.send(x, self._global(dst), group=self.group)
        return None, x

    def recv(self, like: torch.Tensor, src: int, dst: int, tag: str, async_op: bool = False):
        buf = torch.empty_like(like, memory_format=torch.contiguous_format)
        record("recv", tag, dst, 0, _nbytes(buf))
        if async_op:
            return dist.irecv(buf, self._global(src), group=self.group), buf
        dist.recv(buf, self._global(src), group=self.group)
        return None, buf


    def ring_shift(self, x: torch.Tensor, tag: str):
        """Send x [1, *S] to rank + 1 and receive rank - 1's (mod W), both at once (one batched isend / irecv,
        which NCCL needs to pair the two without deadlock). Returns (work, buffer); work.wait() before reading."""
        x = x.contiguous()
        W, me = self.world_size, self.rank
        buf = torch.empty_like(x)
        record("ring_shift", tag, me, _nbytes(x), _nbytes(buf))
        ops = [dist.P2POp(dist.isend, x, self._global((me + 1) % W), self.group),
               dist.P2POp(dist.irecv, buf, self._global((me - 1) % W), self.group)]
        return _AllDone(dist.batch_isend_irecv(ops), keep=x), buf


class _AllDone:
    # the works of one batched isend / irecv; keeps the sent tensor alive until they complete
    def __init__(self, works, keep):
        self.works, self.keep = works, keep

    def wait(self):
        for w in self.works:
            w.wait()
        self.keep = None


class EmuComm:
    """W virtual ranks in one process; rank-axis tensors are [W, ...] and row(rank) == rank."""

    emulated = True

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.rank = 0
        self.ranks = list(range(world_size))
        self._mailbox: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)

    def row(self, rank: int) -> int:
        return rank

    def all_gather(self, x: torch.Tensor, tag: str, async_op: bool = False):
        # x: [W, *S] -> [W, *S]: the gathered buffer every rank would hold
        W = self.world_size
        n = _nbytes(x) // W
        for r in range(W):
            record("all_gather", tag, r, n * (W - 1), n * (W - 1))
        return (x, _Done()) if async_op else x

    def all_reduce(self, x: torch.Tensor, tag: str) -> torch.Tensor:
        # x: [W, *S] -> [W, *S], every row the sum
        W = self.world_size
        moved = 2 * (W - 1) * (_nbytes(x) // W) // W
        for r in range(W):
            record("all_reduce", tag, r, moved, moved)
        return x.sum(0, keepdim=True).expand_as(x).clone()

    def reduce_scatter(self, x: torch.Tensor, tag: str) -> torch.Tensor:
        # x: [W, W, *S] (virtual rank src's contribution to slot r at [src, r]) -> [W, *S], row r = Σ_src x[src, r]
        W = self.world_size
        slot = _nbytes(x) // (W * W)
        for r in range(W):
            record("reduce_scatter", tag, r, slot * (W - 1), slot * (W - 1))
        return x.sum(0)

    def all_to_all(self, x: torch.Tensor, send: list, recv: list, tag: str) -> torch.Tensor:
        """x: the held ranks' send buffers one after another (rank s's rows for rank 0, then for rank 1, ...;
        send[s][d] rows each) -> the receive buffers one after another (rank d's rows from rank 0, 1, ...).
        A reindexing, so autograd differentiates it; recv is implied by send (recv[d][s] == send[s][d])."""
        W = self.world_size
        row = x.element_size() * math.prod(x.shape[1:])
        for r in range(W):
            record("all_to_all", tag, r, (sum(send[r]) - send[r][r]) * row,
                   (sum(send[s][r] for s in range(W)) - send[r][r]) * row)
        blocks = x.split([n for per_rank in send for n in per_rank])
        return torch.cat([blocks[s * W + d] for d in range(W) for s in range(W)])

    def send(self, x: torch.Tensor, src: int, dst: int, tag: str, async_op: bool = False):
        record("send", tag, src, _nbytes(x), 0)
        self._mailbox[(src, dst)].append(x)
        return (_Done() if async_op else None), x

    def recv(self, like: torch.Tensor, src: int, dst: int, tag: str, async_op: bool = False):
        box = self._mailbox[(src, dst)]
        assert box, f"emulated recv {src}->{dst} before the matching send"
        x = box.pop(0)
        record("recv", tag, dst, 0, _nbytes(x))
        return (_Done() if async_op else None), x


    def ring_shift(self, x: torch.Tensor, tag: str):
        # x: [W, *S] -> [W, *S], row r holds row r - 1 (mod W): every virtual rank sends its row to the next
        n = _nbytes(x) // self.world_size
        for r in range(self.world_size):
            record("ring_shift", tag, r, n, n)
        return _Done(), torch.roll(x, 1, dims=0)


def make_comm(owner: str, group=None, emulate: int | None = None):
    """The communicator of a context (`owner` names it in errors): `emulate=W` virtual ranks in one process
    (EmuComm), else the real ranks of an initialised torch.distributed `group` (DistComm)."""
    if emulate is not None:
        if group is not None:
            raise ValueError(f"{owner}: pass either group (real ranks) or emulate=W (virtual ranks), not both")
        if not isinstance(emulate, int) or emulate < 1:
            raise ValueError(f"emulate must be a positive int (number of virtual ranks), got {emulate!r}")
        return EmuComm(emulate)
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{owner}(group=...) needs torch.distributed initialised; use emulate=W for one process")
    return DistComm(group)


class RankGroup:
    """What a context built on a communicator (`self.comm`) says of its ranks (SPContext, EPContext)."""

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def rank(self) -> int:
        """This process's rank in the group (0 in emulation)."""
        return self.comm.rank

    @property
    def emulated(self) -> bool:
        return self.comm.emulated


class _Done:
    def wait(self):
        return None


def _reduce_scatter_fn():
    # torch 2.13 renamed reduce_scatter_tensor (deprecated) to reduce_scatter_single; same (output, input) contract
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _has_agit() -> bool:
    return hasattr(dist, "all_gather_into_tensor") and dist.get_backend() != "gloo"


# ---------------------------------------------------------------- autograd of the collectives used outside SP ops


class AllReduceIdentity(torch.autograd.Function):
    """Forward: Σ over ranks; backward: the incoming gradient unchanged (replicated-loss convention)."""

    @staticmethod
    def forward(ctx, x, comm, tag):
        return comm.all_reduce(x, tag)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class ReplicateSum(torch.autograd.Function):
    """Forward: Σ over ranks of each rank's contribution; backward: Σ over ranks of the replicas' gradients.

    Used for outputs owned by one rank and returned on every rank (final_state): the global objective is the sum
    of the per-rank losses, so a replica's gradient from every rank counts. `token` (a join token, or the token of
    the collective before it) puts the node in the graph on every rank and orders its backward before that one's.
    """

    @staticmethod
    def forward(ctx, x, token, comm, tag):
        from .collectives import replayed

        ctx.comm, ctx.tag = comm, tag
        return replayed(lambda: comm.all_reduce(x, tag))

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_reduce(grad.contiguous(), ctx.tag + ":bwd"), grad.new_empty(0), None, None


def gather_rows(x: torch.Tensor, comm, tag: str) -> torch.Tensor:
    """Differentiable all_gather of rank rows: [R, *S] -> [W, *S] (see `AllGatherRows`)."""
    if comm.emulated:
        return comm.all_gather(x, tag)  # in-memory: autograd sums the shared buffer's gradients itself
    from .collectives import join_token

    return AllGatherRows.apply(x, join_token(), comm, tag)  # every rank joins the backward (collectives.py)


class AllGatherRows(torch.autograd.Function):
    """Forward: all_gather of [R, *S] -> [W, *S] rows (for each held rank: the same gathered buffer).

    Backward (sum semantics, every rank used the gathered rows): a rank's row gradient is the sum over ranks of
    the gradients of its slot: one reduce_scatter of the [W, *S] gradient on NCCL, all_reduce + own slot on gloo
    (`DistComm.reduce_scatter`). In emulation the gathered buffer is shared, so autograd already sums.
    """

    @staticmethod
    def forward(ctx, x, token, comm, tag):
        ctx.comm, ctx.tag = comm, tag
        return comm.all_gather(x, tag)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.reduce_scatter(grad.contiguous().unsqueeze(0), ctx.tag + ":bwd"), None, None, None
