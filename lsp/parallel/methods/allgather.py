"""LASP-2: one all_gather of every segment's map (S_i, A_i), the prefix composed locally (lsp.parallel.affine).

Forward, every rank gathers all segments' (S_i, P_i) and runs E_{i+1} = c_{i+1} (A_i E_i + S_i) up to its last held
segment; backward it gathers (gE_i, P_i) once and runs the suffix G_i = gE_i + c_{i+1} A_iᵀ G_{i+1} locally (the
mirror). Only the held segments' E_i and P_i are kept for backward: nothing of size O(W) outlives the forward.
Bytes per pass: (W-1)·L·(s + m) per rank, s the state and m the map as it travels (a decay vector, or K × K).
"""
from __future__ import annotations

import torch

from ..affine import pack, unpack
from . import register_method


def held_segments(sp) -> list[list[int]]:
    # per rank row: the global segments it holds, in local order
    return [sp.rank_segments(r) for r in sp.comm.ranks]


def _stack_held(sp, per_segment) -> torch.Tensor:
    # [R, L, ...]: per_segment[i] for the segments i held by each rank row, in local order
    return torch.stack([torch.stack([per_segment[i] for i in segs]) for segs in held_segments(sp)])


def prefix_states(S_all, P_all, sp, plan, family, upto: int):
    """E_0 .. E_upto from all segments' S, P (gathered [W, L, ...]). Returns a list of [B, H, K, V]."""
    E = []
    for i in range(upto + 1):
        if i == 0 or not plan.cont[i]:
            E.append(torch.zeros_like(S_all[0, 0]))
            continue
        pr, pl = sp.owner(i - 1)
        A = family.map(None if P_all is None else P_all[pr, pl], plan.passes[i - 1], S_all[pr, pl])
        E.append(family.apply(A, E[i - 1]) + S_all[pr, pl])
    return E


def suffix_grads(gE_all, E_held, P_all, sp, plan, family):
    """Reverse recurrence from the last segment down to the first held one: (∂S, ∂P) of every held segment.

    gE_all: [W, L, ...] direct gradients of every segment's E; E_held: {segment: E_i} of the held segments.
    """
    gS, gP = {}, {}
    X = None  # c_{i+1} G_{i+1}
    for i in reversed(range(min(E_held), sp.num_segments)):
        r, l = sp.owner(i)
        P_i = None if P_all is None else P_all[r, l]
        A_i = family.map(P_i, plan.passes[i], gE_all[r, l])
        if i in E_held:
            gS[i] = torch.zeros_like(E_held[i]) if X is None else X
            gP[i] = None if P_i is None else (torch.zeros_like(P_i) if X is None
                                              else family.grad(P_i, A_i, X, E_held[i], plan.passes[i]))
        G_i = gE_all[r, l] if X is None else gE_all[r, l] + family.apply(A_i, X, transpose=True)
        X = G_i if (i > 0 and plan.cont[i]) else None
    return gS, gP


class GatherHandle:
    """Carries the in-flight gather from the launch node to the finish node (forward) and back (backward). It holds
    a buffer only while a collective is in flight; what backward needs is in the nodes' saved tensors."""

    def __init__(self, sp, plan, family, tag, scan_blocks):
        self.sp, self.plan, self.family, self.tag = sp, plan, family, tag
        self.buf = self.work = self.bwd = None

    def launch(self, S, P):
        # S: [R, L, B, H, K, V]; P: [R, L, B, H, ...] or None
        self.shapes = (S.shape, None if P is None else P.shape, None if P is None else P.dtype)
        self.buf, self.work = self.sp.comm.all_gather(pack(S, P), self.tag, async_op=True)

    def finish(self):
        # wait for the gathered (S, P) of every segment -> E of the held segments [R, L, B, H, K, V]
        buf, self.buf, work, self.work = self.buf, None, self.work, None
        if work is not None:
            work.wait()
        S_all, P_all = unpack(buf, *self.shapes)
        upto = max(max(segs) for segs in held_segments(self.sp))
        return _stack_held(self.sp, prefix_states(S_all, P_all, self.sp, self.plan, self.family, upto))

    def launch_backward(self, gE, E, P):
        self.shapes = (gE.shape, None if P is None else P.shape, None if P is None else P.dtype)
        buf, work = self.sp.comm.all_gather(pack(gE, P), self.tag + ":bwd", async_op=True)
        self.bwd = (buf, work, E)

    def input_grads(self):
        # -> gradients of the launch's S, P
        (buf, work, E_held), self.bwd = self.bwd, None
        if work is not None:
            work.wait()
        sp = self.sp
        gE_all, P_all = unpack(buf, *self.shapes)
        E_map = {i: E_held[row, l] for row, segs in enumerate(held_segments(sp)) for l, i in enumerate(segs)}
        gS, gP = suffix_grads(gE_all, E_map, P_all, sp, self.plan, self.family)
        return _stack_held(sp, gS), (None if P_all is None else _stack_held(sp, gP))


def allgather_cost(W: int, s: float, m: float, t_overlap: float, hw, layout: str, scan_blocks=None):
    """(exposed s, bytes per GPU) of one pass: (W-1)·(α + L·(s+m)/β) less the overlapped local work, plus the local
    prefix over the W·L segments (3·W·L·s bytes at HBM bandwidth); bytes (W-1)·L·(s + m)."""
    if W == 1:
        return 0.0, 0.0
    L = 2 if layout == "zigzag" else 1
    gather = (W - 1) * (hw.latency + L * (s + m) / hw.bandwidth)
    return max(0.0, gather - t_overlap) + 3 * W * L * s / hw.hbm, (W - 1) * L * (s + m)


register_method("allgather", handle=GatherHandle, cost=allgather_cost, label="LASP-2 (all-gather)")

__all__ = ["GatherHandle", "prefix_states", "suffix_grads", "allgather_cost", "held_segments"]
