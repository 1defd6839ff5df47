"""Chunk layout: pad sequences so that chunks never straddle a packed-sequence boundary.

Both the chunked torch path and the Triton kernels work on `[rows, NC * C, H, *]` tensors where every chunk belongs
to exactly one sequence. Without packing a row is a batch row padded at its end; with `cu_seqlens` (B == 1) each
sequence is padded to a whole number of chunks and the sequences are laid end to end in one row. Trailing padding is
exact: k = v = 0 adds nothing to the state and g = 0 leaves it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkLayout:
    rows: int                     # batch rows of the padded tensors
    num_chunks: int               # chunks per row (NC)
    chunk_size: int               # C
    length: int                   # T of the unpadded input
    dst: torch.Tensor | None      # [T] padded position of every input token (packed case), else None
    resets: dict[int, int]        # chunk index -> sequence index whose state starts there (packed case)
    ends: dict[int, list[int]]    # chunk index -> sequences whose final state is the state after that chunk
    empty: list[int]              # sequences of length 0 (their final state is their initial state)

    @property
    def padded_length(self) -> int:
        return self.num_chunks * self.chunk_size

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [rows, NC * C, ...], zeros in the padding (differentiable)."""
        if self.dst is None:
            extra = self.padded_length - x.shape[1]
            if extra == 0:
                return x
            return torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], dim=1)
        out = x.new_zeros(1, self.padded_length, *x.shape[2:])
        return out.index_copy(1, self.dst, x)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """[rows, NC * C, ...] -> [B, T, ...] (differentiable)."""
        if self.dst is None:
            return y[:, : self.length]
        return y.index_select(1, self.dst)


def make_layout(B: int, T: int, bounds: list[tuple[int, int]] | None, chunk_size: int, device) -> ChunkLayout:
    C = chunk_size
    if bounds is None:
        nc = max(1, -(-T // C))
        return ChunkLayout(B, nc, C, T, None, {0: -1}, {nc - 1: [-1]}, [])
    dst_parts, resets, ends, empty = [], {}, {}, []
    chunk = 0
    for n, (s, e) in enumerate(bounds):
        L = e - s
        if L == 0:
            empty.append(n)
            continue
        nc = -(-L // C)
        resets[chunk] = n
        dst_parts.append(torch.arange(chunk * C, chunk * C + L))
        chunk += nc
        ends.setdefault(chunk - 1, []).append(n)
    dst = torch.cat(dst_parts).to(device) if dst_parts else torch.zeros(0, dtype=torch.long, device=device)
    return ChunkLayout(1, max(chunk, 1), C, T, dst, resets, ends, empty)
