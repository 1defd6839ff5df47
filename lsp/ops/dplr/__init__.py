"""The diagonal-plus-low-rank delta rule (RWKV-7): naive reference, chunked WY torch path, and the pieces sequence
parallelism reuses."""
from .api import DPLR_BACKENDS, check_dplr_inputs, dplr_delta_rule
from .chunk import dplr_chunk_output, dplr_flops_per_token, prepare_dplr_chunks

__all__ = ["DPLR_BACKENDS", "dplr_delta_rule", "check_dplr_inputs", "prepare_dplr_chunks", "dplr_chunk_output",
           "dplr_flops_per_token"]
