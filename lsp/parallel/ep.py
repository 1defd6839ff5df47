"""Expert parallelism: the experts of an MoE layer split over the ranks of an EP group, tokens moved by all-to-all.

Each rank routes its own tokens (the router is replicated) and sorts the kept (token, expert) assignments by
expert id. Expert e lives on EP rank e // E_local (E_local = E / ep), so the sorted rows for one rank are contiguous:

1. counts: one all-to-all of the per-expert counts ([ep, E_local] ints per rank), so every rank knows how many rows
   it receives from each source for each of its experts (the variable split sizes of step 2);
2. dispatch: all-to-all of the sorted token rows (`all_to_all_single` with variable splits);
3. the rank's experts run on what arrived, regrouped from (source, expert) to (expert, source) order;
4. combine: the reverse all-to-all brings each row back to its source, in the order it was sent; the source weights
   and sums them (`lsp.models.moe`).

Per MoE layer and rank, steps 2 and 4 move the rows that leave the rank (D values each) forward, and the same again
backward (the gradient of an all-to-all is the reverse all-to-all, `_AllToAll`).

Emulation (`EPContext(emulate=W)`) runs W virtual ranks in one process: the module keeps all E experts and virtual
rank r uses rows [r·E_local, (r+1)·E_local) of them; the all-to-alls are reindexings (`EmuComm.all_to_all`). The
tokens of virtual rank r are the r-th of W equal blocks of batch rows, the rank-major rows of `SPContext(emulate=W)`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .collectives import join_token
from .comm import RankGroup, make_comm


class EPContext(RankGroup):
    """The expert-parallel group: real ranks over a torch.distributed group, or `emulate=W` virtual ranks."""

    def __init__(self, group=None, emulate: int | None = None):
        self.comm = make_comm("EPContext", group, emulate)
        # the fake process group of `lsp plan --measure`: collectives return at once, no other rank routes
        self.fake = emulate is None and dist.get_backend(group) == "fake"

    @property
    def ranks(self) -> list[int]:
        """The ranks whose tokens this process holds (all W emulated, its own one real), in row order."""
        return self.comm.ranks

    def local_experts(self, num_experts: int) -> int:
        if num_experts % self.world_size:
            raise ValueError(f"parallel.ep={self.world_size} does not divide model.moe_experts={num_experts}")
        return num_experts // self.world_size

    def expert_rows(self, rank: int, num_experts: int) -> slice:
        """The rows of a module's expert weights that `rank` runs: its block of all E (emulated), or all of the
        E_local the module keeps (real ranks: `shard_experts` cut them)."""
        n = self.local_experts(num_experts)
        return slice(rank * n, (rank + 1) * n) if self.emulated else slice(0, n)

    def expert_range(self, num_experts: int) -> range:
        """Global ids of the experts this process keeps after `shard_experts` (all of them when emulated)."""
        if self.emulated:
            return range(num_experts)
        n = self.local_experts(num_experts)
        return range(self.rank * n, (self.rank + 1) * n)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over real ranks; backward: the reverse all-to-all of the gradient (send and recv
    swapped). `token` (a join token) keeps the node in every rank's graph, so every rank joins the backward."""

    @staticmethod
    def forward(ctx, x, token, comm, send, recv, tag):
        ctx.comm, ctx.send, ctx.recv, ctx.tag = comm, send, recv, tag
        return comm.all_to_all(x, send, recv, tag)

    @staticmethod
    def backward(ctx, grad):
        back = ctx.comm.all_to_all(grad.contiguous(), ctx.recv, ctx.send, ctx.tag + ":bwd")
        return back, None, None, None, None, None


def all_to_all(x: torch.Tensor, send: list, recv: list, comm, tag: str) -> torch.Tensor:
    """Differentiable all-to-all of rows (see `DistComm.all_to_all` / `EmuComm.all_to_all` for the layouts)."""
    if comm.emulated:
        return comm.all_to_all(x, send, recv, tag)
    return _AllToAll.apply(x, join_token(), comm, send, recv, tag)


def _expert_major(blocks: torch.Tensor) -> torch.Tensor:
    """Permutation from (source, expert) row order to (expert, source) order. blocks: [W, E_local] row counts."""
    W, n = blocks.shape
    block_id = torch.arange(W * n, device=blocks.device).repeat_interleave(blocks.reshape(-1))
    key = (block_id % n) * W + block_id // n
    return torch.argsort(key, stable=True)


def exchange_counts(counts: list[torch.Tensor], ep: EPContext) -> tuple:
    """Step 1. counts: per held rank [E] rows per global expert -> rows sent [R][W], rows received [R][W], rows
    received per local expert [R][E_local] (host ints) and the received counts [R, W, n] ([dst, src, e]; None on
    the fake process group).

    On the fake process group (`lsp plan --measure`) the exchange is counted but brings nothing, and the counts are
    the real uniform ones of `lsp.ops.moe.uniform_counts`: every source then sends this rank what it sends itself."""
    R, E, W = len(counts), counts[0].numel(), ep.world_size
    n = ep.local_experts(E)
    split = [[n] * W for _ in range(R)]
    if not ep.fake:
        sent = torch.stack(counts).view(R, W, n)
        got = ep.comm.all_to_all(sent.reshape(-1), split, split, "ep_counts").view(R, W, n)   # [dst, src, e]
        return sent.sum(-1).tolist(), got.sum(-1).tolist(), got.sum(1).tolist(), got
    ep.comm.all_to_all(torch.zeros(R * E, dtype=torch.long), split, split, "ep_counts")
    with unset_fake_temporarily():
        sent = torch.stack(counts).view(R, W, n)
        got = sent[:, ep.rank:ep.rank + 1].expand(R, W, n)
        return sent.sum(-1).tolist(), got.sum(-1).tolist(), got.sum(1).tolist(), None


def run_experts(xs: list[torch.Tensor], counts: list[torch.Tensor], ep: EPContext, ffn) -> list[torch.Tensor]:
    """The experts' outputs for each held rank's sorted rows, computed where the experts live.

    xs: per held rank r, its kept assignments' inputs sorted by global expert, [M_r, D]; counts: per held rank
    [E] rows per expert; ffn(x [M, D], counts per local expert (list), rank) runs `rank`'s experts on expert-major
    rows. Returns per held rank the outputs [M_r, D] in the order of xs.
    """
    send, recv, per_expert, got = exchange_counts(counts, ep)
    arrived = all_to_all(torch.cat(xs), send, recv, ep.comm, "ep_dispatch").split([sum(r) for r in recv])
    outs = []
    for r, rows in enumerate(arrived):
        # (source, expert) -> (expert, source) order; on the fake process group only its length matters
        perm = torch.arange(rows.shape[0], device=rows.device) if got is None else _expert_major(got[r])
        out = ffn(rows[perm], per_expert[r], ep.ranks[r])
        outs.append(out[torch.argsort(perm)])
    back = all_to_all(torch.cat(outs), recv, send, ep.comm, "ep_combine")
    return list(back.split([sum(s) for s in send]))


__all__ = ["EPContext", "all_to_all", "exchange_counts", "run_experts"]
