"""Exact sequence parallelism: layouts, SP algorithms, comm accounting, emulation (see docs/sp.md)."""
from .collectives import checkpoint_contexts
from .comm import comm_stats, reset_comm_stats
from .context import LAYOUTS, SPContext
from .delta import sp_delta_rule, sp_short_conv
from .dplr import sp_dplr_delta_rule
from .launch import spawn
from .linear import sp_linear_attention
from .methods import check_registered, register_method, sp_method, sp_methods, unregister_method
from .ring_softmax import ring_softmax_attention  # registers softmax_method="ring" beside LASP-2H
from .softmax import (
    SOFTMAX,
    attention_flops_balance,
    attention_pairs_per_rank,
    register_softmax_method,
    softmax_method,
    softmax_methods,
    sp_softmax_attention,
)

check_registered()              # every name the config accepts has an implementation and a cost formula
SOFTMAX.check_registered()      # likewise for the softmax layers' methods (lsp.names.SOFTMAX_SP_METHODS)
METHODS = DELTA_METHODS = sp_methods()   # the built-in methods (every linear family runs every one)

__all__ = ["SPContext", "LAYOUTS", "METHODS", "sp_linear_attention", "sp_softmax_attention", "sp_delta_rule",
           "sp_dplr_delta_rule", "sp_short_conv", "DELTA_METHODS", "softmax_method", "softmax_methods",
           "register_softmax_method", "ring_softmax_attention", "comm_stats", "reset_comm_stats",
           "checkpoint_contexts", "spawn", "attention_pairs_per_rank", "attention_flops_balance", "register_method",
           "unregister_method", "sp_method", "sp_methods", "SOFTMAX"]
