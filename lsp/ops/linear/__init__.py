from . import custom_ops  # noqa: F401  (registers the Triton pieces as torch custom ops)
from .api import BACKENDS, linear_attention
from .local import (
                    LocalPass,
                    add_incoming_state,
                    cum_log_decay,
                    local_output,
                    local_states,
                    segment_state,
                    total_log_decay,
)

__all__ = ["BACKENDS", "linear_attention", "LocalPass", "local_states", "local_output", "segment_state",
           "cum_log_decay", "total_log_decay", "add_incoming_state"]
