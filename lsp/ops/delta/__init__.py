"""The (gated) delta rule: naive reference, chunked WY/UT torch path, and the pieces sequence parallelism reuses."""
from . import custom_ops  # noqa: F401  (registers the Triton kernels as torch custom ops)
from .api import DELTA_BACKENDS, check_delta_inputs, delta_rule, repeat_heads
from .chunk import chunk_output, chunk_scan, enter_sequences, prepare_chunks, sequence_maps
from .conv import short_conv

__all__ = ["DELTA_BACKENDS", "delta_rule", "check_delta_inputs", "repeat_heads", "prepare_chunks", "chunk_scan",
           "chunk_output", "sequence_maps", "enter_sequences", "short_conv"]
