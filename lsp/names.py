"""The names and constants of lsp, defined once (torch-free, so configs and the CLI can check values cheaply).

Every layer imports these instead of spelling them again: config validation, ops, parallel, models, planner, CLI.
"""
from __future__ import annotations

SP_METHODS = ("allgather", "allscan", "ring")          # linear-layer exchange: LASP-2, ZeCO All-Scan, LASP-1
LAYOUTS = ("zigzag", "contiguous")                     # how a sequence is cut over the SP ranks (default first)
KERNEL_BACKENDS = ("auto", "torch", "triton", "naive")  # linear-attention op backends
CHUNK_SIZE = 64                                        # tokens per chunk of the chunked linear-attention paths
SCAN_BLOCKS = 4                                        # default All-Scan pipeline blocks (along K)
IGNORE_INDEX = -100                                    # label of a token that carries no loss

__all__ = ["SP_METHODS", "LAYOUTS", "KERNEL_BACKENDS", "CHUNK_SIZE", "SCAN_BLOCKS", "IGNORE_INDEX"]
