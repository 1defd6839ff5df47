"""The names and constants of lsp, defined once (torch-free, so configs and the CLI can check values cheaply).

Every layer imports these instead of spelling them again: config validation, ops, parallel, models, planner, CLI.
"""
from __future__ import annotations

SP_METHODS = ("allgather", "allscan", "ring")          # the config's choices: registered in lsp/parallel/methods/
SOFTMAX_SP_METHODS = ("allgather", "ring")             # softmax layers: LASP-2H (gather K, V), ring attention
DEFAULT_SP_METHOD = SP_METHODS[0]                      # LASP-2: one collective per layer, the planner's usual pick
DEFAULT_SOFTMAX_METHOD = SOFTMAX_SP_METHODS[0]         # LASP-2H
LAYOUTS = ("zigzag", "contiguous")                     # how a sequence is cut over the SP ranks (default first)
KERNEL_BACKENDS = ("auto", "torch", "triton", "naive")  # linear-attention op backends
CHUNK_SIZE = 64                                        # tokens per chunk of the chunked linear-attention paths
SCAN_BLOCKS = 4                                        # default All-Scan pipeline blocks (along V)
IGNORE_INDEX = -100                                    # label of a token that carries no loss
MOE_ROUTERS = ("softmax", "sigmoid")                   # MoE gate: softmax (Mixtral, Qwen-MoE) | sigmoid (DeepSeek-V3)
# checkpoint.save_on_signals choices: the signals a scheduler or an operator sends (lsp/train/signals.py)
SAVE_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")

__all__ = ["SP_METHODS", "SOFTMAX_SP_METHODS", "DEFAULT_SP_METHOD", "DEFAULT_SOFTMAX_METHOD", "LAYOUTS",
           "KERNEL_BACKENDS", "CHUNK_SIZE", "SCAN_BLOCKS",
           "IGNORE_INDEX", "SAVE_SIGNALS", "MOE_ROUTERS"]
