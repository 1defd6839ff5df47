"""Test-side repair of the Triton interpreter (3.9) for bf16, so that it computes what the compiled kernel computes:

- `tl.dot` on bf16 operands multiplies their raw uint16 storage (the interpreter keeps bf16 as uint16 and calls
  np.matmul on it), giving results of ~1e10: bf16 operands are widened to fp32 first (exact: a bf16 is the top half
  of an fp32);
- `x.to(tl.bfloat16)` from fp32 truncates (rounds toward zero, twice the error and biased), where the GPU rounds to
  nearest even: the cast is redone with round-to-nearest-even.

fp16 / fp32 go through unchanged. Import `interpreter_bf16_dot` (an autouse fixture) into a test module to use it."""
from __future__ import annotations

import numpy as np
import pytest


def _widen(handle):
    import triton.language as tl

    if handle.dtype.scalar == tl.bfloat16:
        return (handle.data.astype(np.uint32) << 16).view(np.float32)
    return handle.data


@pytest.fixture(autouse=True)
def interpreter_bf16_dot(monkeypatch):
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        out = np.matmul(_widen(a), _widen(b), dtype=d.data.dtype) + d.data
        return interpreter.TensorHandle(out, d.dtype.scalar)

    def dispatch(self, a, b, *rest):
        widen = tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar)
        return (create_dot if widen else original)(self, a, b, *rest)

    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
            return interpreter.TensorHandle(out, dst_type.scalar)
        return cast(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", dispatch)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)
    yield
