"""`SPContext`: which rank holds which tokens (the layout), real or emulated ranks, shard / gather.

Layouts over a sequence of T tokens and W ranks:

* "contiguous": W segments of T/W tokens; rank r holds segment r.
* "zigzag": 2W segments of T/(2W) tokens; rank r holds segments r and 2W-1-r (in that order), which balances the
  causal softmax work (every rank gets one early and one late segment).

Emulation (`emulate=W`) runs W virtual ranks in one process by folding the rank axis into the batch axis:
`shard` maps [B, T, ...] to [W·B, T/W, ...] with row r·B + b holding rank r's tokens of batch row b. With real
ranks `shard` returns this rank's [B, T/W, ...]. Model code is the same in both modes; the SP attention functions
unfold [R·B] into [R, B] (R = W emulated, 1 real) and run the same algorithm.
"""
from __future__ import annotations

import torch

from lsp.names import DEFAULT_SOFTMAX_METHOD, DEFAULT_SP_METHOD, LAYOUTS, SCAN_BLOCKS, SOFTMAX_SP_METHODS
from lsp.ops.boundaries import boundaries

from .comm import AllReduceIdentity, RankGroup, gather_rows, make_comm
from .methods import sp_method
from .segments import SegmentPlan, plan_segments


class SPContext(RankGroup):
    """The sequence-parallel context: ranks (real or emulated), layout, and the settings every SP layer shares.

    method / scan_blocks: the linear layers' exchange, a registered SP method (lsp.parallel.methods: LASP-2
    all-gather, ZeCO All-Scan, LASP-1 ring, ...) and All-Scan's pipeline blocks; softmax_method: the softmax
    layers' ("allgather" LASP-2H, "ring" ring attention). The segment plan of a batch is built once
    (`segment_plan`) and reused by every layer that sees the same batch.
    """

    def __init__(self, group=None, layout: str = "zigzag", emulate: int | None = None, *,
                 method: str = DEFAULT_SP_METHOD, scan_blocks: int = SCAN_BLOCKS,
                 softmax_method: str = DEFAULT_SOFTMAX_METHOD):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        sp_method(method)   # a registry lookup: an unknown name raises
        if softmax_method not in SOFTMAX_SP_METHODS:
            raise ValueError(f"softmax_method must be one of {SOFTMAX_SP_METHODS}, got {softmax_method!r}")
        if not isinstance(scan_blocks, int) or scan_blocks < 1:
            raise ValueError(f"scan_blocks must be a positive int, got {scan_blocks!r}")
        self.comm = make_comm("SPContext", group, emulate)
        self.layout, self.method, self.scan_blocks = layout, method, scan_blocks
        self.softmax_method = softmax_method
        self._plan: SegmentPlan | None = None

    # ------------------------------------------------------------------ the batch
    def segment_plan(self, T_local: int, cu_seqlens: torch.Tensor | None = None) -> SegmentPlan:
        """The segment plan of the current batch: built on the first call for (T_local, cu_seqlens), then reused by
        every layer. Packed, it lives in the batch's one cache of derived plans (lsp.ops.boundaries, keyed by the
        cu_seqlens tensor), built from the boundaries' host copy; unpacked, it depends on T_local only."""
        if cu_seqlens is not None:
            key = ("segment_plan", self.layout, self.world_size, tuple(self.comm.ranks), T_local)
            return boundaries(cu_seqlens).derived(key, lambda: plan_segments(self, T_local, cu_seqlens))
        p = self._plan
        if p is None or p.T_local != T_local:
            p = self._plan = plan_segments(self, T_local, None)
        return p

    # ------------------------------------------------------------ topology (world_size, rank, emulated: RankGroup)
    @property
    def rows(self) -> int:
        """R: rank rows held by this process (W emulated, 1 real)."""
        return len(self.comm.ranks)

    @property
    def num_segments(self) -> int:
        return self.world_size * self.segments_per_rank

    @property
    def segments_per_rank(self) -> int:
        return 2 if self.layout == "zigzag" else 1

    def rank_segments(self, rank: int) -> list[int]:
        """Global segment indices held by `rank`, in increasing (= local) order."""
        if self.layout == "contiguous":
            return [rank]
        return [rank, 2 * self.world_size - 1 - rank]

    def owner(self, seg: int) -> tuple[int, int]:
        """(rank, local segment index) of global segment `seg`."""
        W = self.world_size
        if self.layout == "contiguous":
            return seg, 0
        return (seg, 0) if seg < W else (2 * W - 1 - seg, 1)

    def segment_length(self, T_local: int) -> int:
        L = self.segments_per_rank
        if T_local % L:
            raise ValueError(f"local length {T_local} must be divisible by {L} segments per rank "
                             f"({self.layout} layout)")
        return T_local // L

    # ------------------------------------------------------------------ data movement
    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of x ([B, T, ...] -> [B, T/W, ...]; emulated: [W·B, T/W, ...], rank-major rows)."""
        n = self.num_segments
        if x.shape[dim] % n:
            raise ValueError(f"sequence length {x.shape[dim]} (dim {dim}) must be divisible by {n} segments "
                             f"(world_size={self.world_size}, layout={self.layout!r})")
        segs = x.chunk(n, dim=dim)
        parts = [torch.cat([segs[s] for s in self.rank_segments(r)], dim=dim) for r in self.comm.ranks]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def gather(self, x_local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Inverse of `shard`: the full [B, T, ...] sequence (differentiable).

        With real ranks every rank gets a replica; its backward keeps only this rank's slice of the local gradient
        (the replicated-loss convention: every rank uses the gathered tensor the same way). In emulation there is
        one copy.
        """
        x = x_local.movedim(dim, 1)
        R, W, L = self.rows, self.world_size, self.segments_per_rank
        B = x.shape[0] // R
        if not self.emulated:
            rows = _GatherReplica.apply(x.unsqueeze(0), self.comm)  # [W, B, T_local, ...]
        else:
            rows = x.reshape(R, B, *x.shape[1:])
        segs = rows.reshape(W, B, L, x.shape[1] // L, *x.shape[2:])
        order = [segs[self.owner(s)[0], :, self.owner(s)[1]] for s in range(self.num_segments)]
        return torch.cat(order, dim=1).movedim(1, dim)

    def local_positions(self, T_local: int, device=None) -> torch.Tensor:
        """Global token positions of the local tokens: LongTensor [R, T_local] (row per held rank)."""
        Ts = self.segment_length(T_local)
        ar = torch.arange(Ts, device=device)
        return torch.stack([torch.cat([s * Ts + ar for s in self.rank_segments(r)]) for r in self.comm.ranks])

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of x, on every rank; backward: the incoming gradient unchanged.

        For a global-mean loss every rank computes `all_reduce_sum(local_sum) / N_global`; the identity backward
        gives each rank's local terms the gradient of that one (replicated) loss. In emulation the folded batch
        already holds every virtual rank's terms, so x is the global sum and this is the identity.
        """
        if self.emulated:
            return x
        return AllReduceIdentity.apply(x, self.comm, "all_reduce_sum")


class _GatherReplica(torch.autograd.Function):
    # x: [1, *S] -> [W, *S]; backward: this rank's slot of the local gradient (no communication)

    @staticmethod
    def forward(ctx, x, comm):
        ctx.rank = comm.rank
        return comm.all_gather(x, "gather")

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank : ctx.rank + 1].contiguous(), None


__all__ = ["SPContext", "LAYOUTS", "gather_rows"]
