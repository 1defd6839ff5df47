from .api import BACKENDS, linear_attention
from .local import add_incoming_state, carry_state, cum_log_decay, segment_state

__all__ = ["BACKENDS", "linear_attention", "segment_state", "cum_log_decay", "add_incoming_state", "carry_state"]
