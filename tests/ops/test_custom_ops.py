"""The Triton linear-attention op and its SP pieces as torch custom ops (lsp/ops/linear/custom_ops.py).

Fake tensors (what `lsp plan --measure` runs on) and meta tensors go through the ops' `register_fake`; the real
tensors run the kernels under the Triton interpreter (tiny shapes). Checked here:
- the fake op saves for backward exactly the bytes the real Triton op saves (saved-tensor hooks, distinct storages):
  q, k, v, g and the initial state for the op and for the SP pieces with recomputation; the pieces without it
  keep h too, which the same count must see (the negative control);
- every output and gradient of the fake / meta op has the real one's shape and dtype;
- FlopCounterMode counts the ops with their registered formulas, equal on fake and real tensors.
Exactness of the math is tests/ops/test_triton*.py (the kernels and launchers are unchanged).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # read when triton is imported (torch.utils.flop_counter and fake tensors import it): set it first
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lsp.ops import linear_attention  # noqa: E402
from lsp.ops.estimate import gpu_code_paths, measured_linear_backend  # noqa: E402
from lsp.ops.linear.custom_ops import chunk_flops, register_flop_formulas  # noqa: E402
from lsp.ops.linear.local import local_output, local_states  # noqa: E402
from lsp.ops.linear.triton_chunk import kern, triton_chunk_output, triton_chunk_states  # noqa: E402

from .linear_cases import make_inputs  # noqa: E402
from .saved import as_fake, saved_bytes  # noqa: E402
from .triton_interp import interpreter_bf16_dot  # noqa: E402,F401

pytestmark = pytest.mark.skipif(type(kern._fwd_state_kernel).__name__ != "InterpretedFunction"
                                and not torch.cuda.is_available(), reason="Triton kernels imported without the "
                                "interpreter before this module set TRITON_INTERPRET=1")
SHAPE = dict(B=1, T=70, H=2, K=16, V=8)       # two chunks, the second partial


def _inputs(form, fake_mode=None):
    xs = make_inputs(form, **SHAPE, dtype=torch.float32, init=True)
    if fake_mode is None:
        return xs
    return as_fake(xs, fake_mode)


def _op(q, k, v, g, s0):
    return linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="triton")


def _pieces(recompute):
    def run(q, k, v, g, s0):
        g4 = None if g is None else g.unsqueeze(-1) if g.dim() == 3 else g
        if recompute:   # what sp_linear_attention runs: h rebuilt in backward
            lp, final = local_states(k, v, g, initial_state=s0, backend="triton")
            return local_output(q, lp, 0.25), final
        h, final = triton_chunk_states(k, v, g4, s0)
        return triton_chunk_output(q, k, v, g4, h, 0.25), final
    return run


def _both(fn, form):
    """(real, fake) saved bytes of fn (fake inputs made from real ones, outside the mode)."""
    real = saved_bytes(lambda: fn(*_inputs(form)))
    mode = FakeTensorMode()
    fake_inputs = _inputs(form, mode)
    with mode, gpu_code_paths():
        fake = saved_bytes(lambda: fn(*fake_inputs))
    return real, fake


@pytest.mark.parametrize("form", ["none", "scalar", "key"])
def test_fake_op_saves_what_the_triton_op_saves(form):
    assert measured_linear_backend() == "triton"                  # importing lsp.ops registered the ops
    inputs = [x for x in _inputs(form) if x is not None]
    kept = sum(x.numel() * x.element_size() for x in inputs)      # q, k, v, g, initial state
    for fn in (_op, _pieces(recompute=True)):
        real, fake = _both(fn, form)
        assert real == fake == kept, (fn, real, fake, kept)
    # negative control: the pieces without recomputation keep h [1, H, 2 chunks, K, V] fp32 instead of the
    # initial state [1, H, K, V]; the same count must see the difference
    real, fake = _both(_pieces(recompute=False), form)
    h, init = (SHAPE["H"] * n * SHAPE["K"] * SHAPE["V"] * 4 for n in (2, 1))
    assert real == fake == kept - init + h != kept


def _shapes(fn, inputs):
    o, final = fn(*inputs)
    grads = torch.autograd.grad((o.float().sum() + final.sum()), [x for x in inputs if x is not None])
    return [(tuple(t.shape), t.dtype) for t in (o, final, *grads)]


@pytest.mark.parametrize("fn", [_op, _pieces(True), _pieces(False)], ids=["op", "pieces", "pieces-keep-h"])
def test_fake_and_meta_shapes_match_the_real_op(fn):
    real = _shapes(fn, _inputs("key"))
    mode = FakeTensorMode()
    fake_inputs = _inputs("key", mode)
    with mode:
        fake = _shapes(fn, fake_inputs)
    meta = _shapes(fn, [None if x is None else x.detach().to("meta").requires_grad_(True) for x in _inputs("key")])
    assert real == fake == meta
    assert real != _shapes(fn, _inputs("scalar"))      # control: the decay's shape reaches its gradient


def test_flop_counter_counts_the_ops_with_their_formulas():
    register_flop_formulas()
    counts = []
    for mode in (None, FakeTensorMode()):
        q, k, v, g, s0 = _inputs("key", mode)
        with mode or torch.device("cpu"), FlopCounterMode(display=False) as counter:
            o, final = _op(q, k, v, g, s0)
            (o.sum() + final.sum()).backward()
        counts.append(counter.get_total_flops())
    c = chunk_flops(1, SHAPE["T"], SHAPE["H"], SHAPE["K"], SHAPE["V"])
    # forward S + O, backward twice that plus the recomputed states scan; nothing else is a matmul here
    assert counts[0] == counts[1] == 4 * c["states"] + 3 * c["output"]
    assert c["output"] == 2 * 128 * (2 * 64 * (16 + 8) + 2 * 16 * 8)      # 2 heads x 2 padded chunks of 64
