"""Single-device math: naive reference, chunked torch, Triton kernels. Never imports torch.distributed."""
from .delta import delta_rule
from .dplr import dplr_delta_rule
from .linear import add_incoming_state, cum_log_decay, linear_attention, segment_state
from .softmax import softmax_attention

__all__ = ["linear_attention", "delta_rule", "dplr_delta_rule", "softmax_attention", "segment_state", "cum_log_decay",
           "add_incoming_state"]
