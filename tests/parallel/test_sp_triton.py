"""sp_linear_attention with the Triton local pass (the GPU path), against the step-by-step fp64 recurrence.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported), so
shapes stay tiny: 64 tokens per rank (zigzag segments of 32, contiguous of 64), one head, K = V = 16. Tolerance: the
kernels accumulate fp32 inputs in fp32, errors ~1e-6 measured; 1e-4 as in tests/ops/test_triton.py. The negative
control drops the cross-segment decay and must fail.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from lsp.ops.probe import triton_available  # noqa: E402
from lsp.parallel import SPContext  # noqa: E402
from lsp.parallel import affine as affine_mod  # noqa: E402
from tests.ops.test_triton_budget import launches  # noqa: E402,F401

from .cases import METHODS, make_case, max_rel_err, reference, run_sp  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(torch.device("cpu")) and not torch.cuda.is_available(),
                                reason="Triton needs CUDA or TRITON_INTERPRET=1 before it is imported")
TOL32 = 1e-4


def _case(W, form, varlen):
    case = make_case(W, form, varlen, dtype=torch.float32, T_per_rank=64, H=1, K=16, V=16)
    ref = reference({n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
                     for n, x in case.items()})
    return case, ref


def _check(form, varlen, layouts):
    case, ref = _case(2, form, varlen)
    for layout in layouts:
        for method in METHODS:
            got = run_sp(case, SPContext(emulate=2, layout=layout), method, backend="triton")
            err = max_rel_err({n: got[n].double() for n in ref}, ref)
            assert max(err.values()) < TOL32, (layout, method, err)


def test_sp_triton_local_pass_equals_the_recurrence():
    """Per-key decay, packed documents crossing ranks, zigzag, every method (the default suite's case)."""
    _check("key", True, ("zigzag",))


@pytest.mark.slow
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("form", ["none", "head", "scalar", "key"])
def test_sp_triton_matrix(form, varlen):
    _check(form, varlen, ("contiguous", "zigzag"))


def test_sp_triton_negative_control(monkeypatch):
    case, ref = _case(2, "key", False)
    decay = affine_mod._decay
    monkeypatch.setattr(affine_mod, "_decay", lambda a, p: decay(None if a is None else torch.zeros_like(a), p))
    got = run_sp(case, SPContext(emulate=2, layout="zigzag"), "allgather", backend="triton")
    assert max_rel_err({"o": got["o"].double()}, {"o": ref["o"]})["o"] > 1e-2


@pytest.mark.parametrize("form", ["none", "key"])
def test_sp_triton_keeps_what_the_op_keeps(form):
    """With the Triton local pass, SP at W=1 keeps <= 1.25x the op's bytes for backward: the two pieces rebuild the
    chunk states h in backward (one scan) as the op does, instead of keeping them (1.5-1.67x at d=128 if kept)."""
    from lsp.ops import linear_attention
    from lsp.parallel import sp_linear_attention
    from lsp.plan.measure import saved_bytes

    case = make_case(1, form, False, dtype=torch.float32, T_per_rank=128, H=2, K=32, V=32)
    x = {n: case[n].clone().requires_grad_() for n in ("q", "k", "v")}
    g = None if case["g"] is None else case["g"].clone().requires_grad_()
    op = saved_bytes(lambda: linear_attention(x["q"], x["k"], x["v"], g, backend="triton"))
    sp = SPContext(emulate=1, layout="contiguous")
    got = saved_bytes(lambda: sp_linear_attention(x["q"], x["k"], x["v"], g, sp=sp, backend="triton"))
    assert got <= 1.25 * op, (got / op, got, op)


def test_sp_triton_launches_do_not_grow_with_T(launches):  # noqa: F811 (fixture from tests/ops/test_triton_budget.py)
    """Kernel launches of one SP layer call (forward + backward, packed documents) do not grow with T_local: the
    local pass launches its kernels once for all held segments and pieces, never per chunk or per segment."""
    counts = {}
    for T_per_rank in (64, 192):
        case = make_case(2, "key", True, dtype=torch.float32, T_per_rank=T_per_rank, H=1, K=16, V=16)
        launches.clear()
        run_sp(case, SPContext(emulate=2, layout="zigzag"), "allgather", backend="triton")
        counts[T_per_rank] = len(launches)
    assert counts[64] == counts[192] > 0, counts
