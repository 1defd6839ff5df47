"""Exact sequence parallelism: layouts, SP algorithms, comm accounting, emulation (see docs/sp.md)."""
from .comm import comm_stats, reset_comm_stats
from .context import LAYOUTS, SPContext
from .linear import METHODS, sp_linear_attention

__all__ = ["SPContext", "LAYOUTS", "METHODS", "sp_linear_attention", "comm_stats", "reset_comm_stats"]
