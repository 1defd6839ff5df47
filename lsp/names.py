"""The names and constants of lsp, defined once (torch-free, so configs and the CLI can check values cheaply).

Every layer imports these instead of spelling them again: config validation, ops, parallel, models, planner, CLI.
"""
from __future__ import annotations

SP_METHODS = ("allgather", "allscan", "ring")          # linear-layer exchange: LASP-2, ZeCO All-Scan, LASP-1
LAYOUTS = ("zigzag", "contiguous")                     # how a sequence is cut over the SP ranks (default first)
KERNEL_BACKENDS = ("auto", "torch", "triton", "naive")  # linear-attention op backends
DECAY_VARIANTS = ("linear", "lightning", "simple_gla", "gla")   # decay-only linear attention layers
DELTA_VARIANTS = ("deltanet", "gated_deltanet")                 # delta-rule layers
LINEAR_VARIANTS = DECAY_VARIANTS + DELTA_VARIANTS               # every `L` layer kind (model.linear_attn)
CHUNK_SIZE = 64                                        # tokens per chunk of the chunked linear-attention paths
SCAN_BLOCKS = 4                                        # default All-Scan pipeline blocks (along K)
IGNORE_INDEX = -100                                    # label of a token that carries no loss
MOE_ROUTERS = ("softmax", "sigmoid")                   # MoE gate: softmax (Mixtral, Qwen-MoE) | sigmoid (DeepSeek-V3)

__all__ = ["SP_METHODS", "LAYOUTS", "KERNEL_BACKENDS", "DECAY_VARIANTS", "DELTA_VARIANTS", "LINEAR_VARIANTS",
           "CHUNK_SIZE", "SCAN_BLOCKS", "IGNORE_INDEX", "MOE_ROUTERS"]
