"""The segment plan of one batch: which segment edges a state crosses and how packed documents cut the segments.

Built once per batch on the host (`SPContext.segment_plan`, from the boundaries' host copy, lsp.ops.boundaries),
kept in the batch's one cache of derived plans and handed to every layer through the context; no layer reads
cu_seqlens or synchronises with the device.

The sequence is cut into n ordered segments of Ts tokens (W contiguous, 2W zigzag); rank rows hold L of them. For
packed documents the held segments are laid end to end in one packed row cut at every segment edge and every
document start ("pieces"), so one local call serves all of them.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from lsp.ops.boundaries import boundaries, remember


@dataclass
class SegmentPlan:
    """Host-side description of the segments of one batch (see the module docstring)."""

    T_local: int
    Ts: int                          # tokens per segment
    cont: list[int]                  # per global segment: 1 if the state entering it is carried from the previous one
    passes: list[int]                # per global segment: 1 if no document starts strictly inside it
    bounds: list[int] = field(default_factory=list)  # global document boundaries on the host ([0, T] unpacked)
    packed: bool = False             # built from packed boundaries (it lives in their cache: lsp.ops.boundaries)
    num_docs: int = 0
    # packed case only, pieces of the held segments in (row, local segment) order:
    local_cu: list[int] = field(default_factory=list)       # piece boundaries in the packed local row
    piece_init: list[int] = field(default_factory=list)     # per piece: 1 + document whose initial state enters, or 0
    last_piece: list[int] = field(default_factory=list)     # per held segment row: index of its last piece
    first_internal: list[int] = field(default_factory=list)  # per held segment row: offset of its first inner start
    # documents whose last token is held here: document, its last piece, its rank row; and (index into these
    # lists, seg row, end offset) of those whose piece starts at the segment start and carries the incoming state
    end_docs: list[int] = field(default_factory=list)
    end_pieces: list[int] = field(default_factory=list)
    end_rank_rows: list[int] = field(default_factory=list)
    carried_ends: list[tuple[int, int, int]] = field(default_factory=list)
    _on_device: dict = field(default_factory=dict)
    _derived: dict = field(default_factory=dict)

    @property
    def inner_starts(self) -> bool:
        """Some held segment row has a document starting inside it (tokens after it see no incoming state)."""
        return any(f < self.Ts for f in self.first_internal)

    def derived(self, key, build):
        """A further host-side plan of this batch (e.g. the softmax layers' pieces), built once: build()."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def local_boundaries(self) -> torch.Tensor:
        """local_cu as a host int32 tensor with its host list recorded: the local op reads nothing back."""
        return self.derived("local_cu", lambda: remember(torch.tensor(self.local_cu, dtype=torch.int32),
                                                         self.local_cu))

    def tensor(self, name: str, device, dtype=torch.long) -> torch.Tensor:
        """A list field as a tensor on `device`, built once per plan and device."""
        key = (name, str(device), dtype)
        if key not in self._on_device:
            self._on_device[key] = torch.tensor(getattr(self, name), dtype=dtype, device=device)
        return self._on_device[key]


def plan_segments(sp, T_local: int, cu_seqlens: torch.Tensor | None) -> SegmentPlan:
    """The plan of a batch of T_local tokens per rank (global cu_seqlens or None). One host read of cu_seqlens."""
    n, Ts = sp.num_segments, sp.segment_length(T_local)
    if cu_seqlens is None:
        return SegmentPlan(T_local, Ts, cont=[0] + [1] * (n - 1), passes=[1] * n, bounds=[0, n * Ts])
    bounds = boundaries(cu_seqlens).host   # the loader's host copy (or one read, cached with the batch)
    if bounds[0] != 0 or bounds[-1] != n * Ts or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to the global length {n * Ts} (no empty documents), "
                         f"got {bounds}")
    starts = bounds[:-1]
    start_set = set(starts)
    inner = _inner_starts(starts, n, Ts)
    plan = SegmentPlan(T_local, Ts, cont=[0] + [0 if i * Ts in start_set else 1 for i in range(1, n)],
                       passes=[0 if inner[i] else 1 for i in range(n)], bounds=bounds,
                       packed=True, num_docs=len(bounds) - 1)
    seg_row = 0
    for rank_row, r in enumerate(sp.comm.ranks):
        for i in sp.rank_segments(r):
            _add_pieces(plan, bounds, inner[i], i, seg_row, rank_row)
            seg_row += 1
    plan.local_cu.append(seg_row * Ts)
    return plan


def _inner_starts(starts: list[int], n: int, Ts: int) -> list[list[int]]:
    # per segment: offsets of the document starts strictly inside it (one pass over the sorted starts)
    inner = [[] for _ in range(n)]
    for b in starts:
        i, off = divmod(b, Ts)
        if off and i < n:
            inner[i].append(off)
    return inner


def _add_pieces(plan: SegmentPlan, bounds: list[int], inner: list[int], i: int, seg_row: int, rank_row: int):
    Ts = plan.Ts
    doc0 = bisect.bisect_right(bounds, i * Ts) - 1  # document holding the segment's first token
    for j, off in enumerate([0] + inner):
        doc = doc0 + j
        fresh = off > 0 or not plan.cont[i]
        plan.piece_init.append(doc + 1 if fresh else 0)
        plan.local_cu.append(seg_row * Ts + off)
        end = bounds[doc + 1] - 1 - i * Ts
        if end < Ts:  # the document ends in this piece
            if j == 0 and plan.cont[i]:
                plan.carried_ends.append((len(plan.end_docs), seg_row, end))
            plan.end_docs.append(doc)
            plan.end_pieces.append(len(plan.piece_init) - 1)
            plan.end_rank_rows.append(rank_row)
    plan.last_piece.append(len(plan.piece_init) - 1)
    plan.first_internal.append(inner[0] if inner else Ts)


__all__ = ["SegmentPlan", "plan_segments"]
