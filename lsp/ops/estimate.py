"""The estimator switch: run the GPU code paths on (fake) CPU tensors, so that `lsp plan --measure` counts what a
GPU step would allocate and compute.

Inside `gpu_code_paths()`, `backend="auto"` resolves to the backend a CUDA device would use, where that backend can
run on the tensors at hand: Triton, whose kernels are torch custom ops with fake implementations
(`lsp.ops.linear.custom_ops`, imported with `lsp.ops`, calls `register_fake_capable("triton")` when triton is
installed; `lsp.ops.delta.custom_ops` likewise for the delta rule), else the chunked torch path. On real CPU tensors
the Triton path then needs TRITON_INTERPRET=1. `measured_backend(op)` says which one a measurement ran. Softmax
layers need no switch: on CPU they run the flash kernel (`_scaled_dot_product_flash_attention_for_cpu`), which
keeps the tensors CUDA FlashAttention keeps (q, k, v, o and the log-sum-exp).
"""
from __future__ import annotations

import contextlib

_ACTIVE = [False]
_FAKE_CAPABLE: set[tuple[str, str]] = set()   # (op, GPU backend) whose kernels have fake implementations


def register_fake_capable(backend: str, op: str = "linear_attention") -> None:
    """Called by the module that registers `op`'s `backend` kernels as custom ops with `register_fake`."""
    _FAKE_CAPABLE.add((op, backend))


@contextlib.contextmanager
def gpu_code_paths():
    """Select the GPU code paths whatever the tensors' device (for fake-tensor measurement only)."""
    before, _ACTIVE[0] = _ACTIVE[0], True
    try:
        yield
    finally:
        _ACTIVE[0] = before


def gpu_code_paths_active() -> bool:
    return _ACTIVE[0]


def measured_backend(op: str) -> str:
    """The backend `auto` resolves to inside `gpu_code_paths()` for `op` ("linear_attention", "delta_rule")."""
    return "triton" if (op, "triton") in _FAKE_CAPABLE else "torch"


def measured_linear_backend() -> str:
    """The linear-attention backend `auto` resolves to inside `gpu_code_paths()`."""
    return measured_backend("linear_attention")
