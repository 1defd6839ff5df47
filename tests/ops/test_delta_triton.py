"""The delta rule on Triton (backend="triton": UT transform, scan and outputs in kernels) against the naive
recurrence, every gradient included.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before the kernels are
first imported): shapes stay tiny. Tolerances as tests/ops/test_delta.py (fp64 1e-9, fp32 vs fp64 naive 1e-4):
the kernel computes the same products in full precision (input_precision="ieee"); measured errors against the
torch scan are ~1e-16 (fp64) and ~3e-7 (fp32).
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from lsp.ops import delta_rule  # noqa: E402
from lsp.ops.delta import chunk as chunk_mod  # noqa: E402
from lsp.parallel import SPContext  # noqa: E402

from .delta_cases import detached64, make_delta_inputs, run_delta_with_grads  # noqa: E402
from .linear_cases import assert_close, max_rel_err  # noqa: E402
from .triton_interp import interpreter_bf16_dot  # noqa: E402,F401 (bf16 dots computed as a GPU does)

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CU = torch.tensor([0, 10, 10, 64, 65, 150], dtype=torch.int32)   # inside a chunk, a chunk edge, empty, length 1


def _ref(x, **kw):
    return run_delta_with_grads(delta_rule, detached64(x), backend="naive", **kw)


def _on_device(x):
    return {n: None if t is None else t.detach().to(DEVICE).requires_grad_() for n, t in x.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gated,init,varlen", [(True, True, False), (False, False, False), (True, True, True),
                                               (False, True, True)])
def test_triton_matches_naive(gated, init, varlen, dtype):
    kw = {"cu_seqlens": CU.to(DEVICE)} if varlen else {}
    x = make_delta_inputs(gated, B=1 if varlen else 2, T=150 if varlen else 130, K=16, V=24, dtype=dtype, init=init,
                          n_seq=5 if varlen else None)
    res = run_delta_with_grads(delta_rule, _on_device(x), backend="triton", **kw)
    ref = _ref(x, **({"cu_seqlens": CU} if varlen else {}))
    assert_close({n: t.cpu() for n, t in res.items()}, ref, TOL[dtype], f"gated={gated} varlen={varlen}")


def test_grouped_value_heads():
    """HV = 2·H value heads on the kernels (q and k repeated per value head before them); gradients of q and k
    summed over each group."""
    x = make_delta_inputs(True, B=1, T=40, H=1, K=16, V=16, groups=2)
    res = run_delta_with_grads(delta_rule, _on_device(x), backend="triton")
    assert_close({n: t.cpu() for n, t in res.items()}, _ref(x), TOL[torch.float64], "grouped value heads")


def test_negative_control_kernel_ignoring_decay_is_caught(monkeypatch):
    x = make_delta_inputs(True, T=130, K=16, V=16)
    ref = _ref(x)
    scan = chunk_mod._triton_scan
    monkeypatch.setattr(chunk_mod, "_triton_scan", lambda ch, U, init: scan(dataclasses.replace(ch, decay=None),
                                                                              U, init))
    with pytest.raises(AssertionError):
        assert_close(run_delta_with_grads(delta_rule, _on_device(x), backend="triton"), ref, TOL[torch.float64])


@pytest.mark.parametrize("gated,K,V,T", [(True, 32, 32, 100), (False, 32, 32, 100), (True, 80, 48, 70)])
def test_triton_matches_naive_wider_heads(gated, K, V, T):
    """d = 32 at T = 100 (a partial second chunk), and K = 80, V = 48: several K and V blocks with masked tails in
    every kernel (blocks of 64 forward, 32 in the backward's per-chunk kernels); fp32, initial and final state."""
    x = make_delta_inputs(gated, B=1, T=T, H=2, K=K, V=V, dtype=torch.float32)
    res = run_delta_with_grads(delta_rule, _on_device(x), backend="triton")
    assert_close({n: t.cpu() for n, t in res.items()}, _ref(x), TOL[torch.float32], f"gated={gated} K={K} V={V}")


class _DropArgument:
    """A kernel launched with its argument `index` zeroed (a backward that forgets one term)."""

    def __init__(self, kernel, index):
        self.kernel, self.index = kernel, index

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            args = list(args)
            args[self.index] = torch.zeros_like(args[self.index])
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("wrong", ["output without intra-chunk decay", "UT transform without beta",
                                   "backward without the decay's gradient", "backward without dA's key gradient"])
def test_negative_control_wrong_intra_kernel_is_caught(monkeypatch, wrong):
    from lsp.ops.delta import triton_chunk

    x = make_delta_inputs(True, T=130, K=16, V=16)
    ref = _ref(x)
    if wrong.startswith("output"):
        out = triton_chunk.output
        monkeypatch.setattr(triton_chunk, "output", lambda qc, kc, gc, *a: out(qc, kc, None, *a))
    elif wrong.startswith("UT"):
        ut = triton_chunk.ut_transform
        monkeypatch.setattr(triton_chunk, "ut_transform",
                            lambda kc, vc, bc, *a: ut(kc, vc, torch.ones_like(bc), *a))
    else:                    # the key kernel's input ddec (argument 11) or dkk (argument 9) zeroed
        index = 11 if "decay" in wrong else 9
        monkeypatch.setattr(triton_chunk, "_bwd_k_kernel", _DropArgument(triton_chunk._bwd_k_kernel, index))
    with pytest.raises(AssertionError):
        assert_close(run_delta_with_grads(delta_rule, _on_device(x), backend="triton"), ref, TOL[torch.float64])


def test_sp_with_triton_scan(monkeypatch):
    """sp_delta_rule on the Triton scan (the augmented [M | S] scan included) equals the op, gradients included."""
    from tests.parallel.cases import max_rel_err
    from tests.parallel.delta_cases import delta_reference, make_delta_case, run_sp_delta

    calls, scan = [], chunk_mod._triton_scan
    monkeypatch.setattr(chunk_mod, "_triton_scan", lambda *a: calls.append(1) or scan(*a))
    case = make_delta_case(2, True, True, K=16, V=16)
    err = max_rel_err(run_sp_delta(case, SPContext(emulate=2, layout="zigzag"), "ring", backend="triton"),
                      delta_reference(case))
    assert calls and max(err.values()) < 1e-10, err


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_16bit_inputs(dtype, tol):
    """16-bit inputs: the chunk-level products take 16-bit operands (T and the states rounded to the input dtype,
    as fla) with fp32 accumulation, the scans tf32 (the interpreter computes tf32 exactly; on a GPU it rounds at
    2^-11, below bf16's 2^-8); the output in the input dtype, the final state in fp32. Tolerance: a few roundings
    of the input dtype (bf16 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4) through the chunk's products."""
    x = make_delta_inputs(True, T=130, K=16, V=16, dtype=dtype)
    res = run_delta_with_grads(delta_rule, _on_device(x), backend="triton")
    assert res["o"].dtype == dtype and res["final_state"].dtype == torch.float32
    ref = _ref(x)
    for name in ("o", "final_state", "dq", "dk", "dv", "dbeta", "dg", "dinitial_state"):
        assert max_rel_err(res[name].cpu(), ref[name]) < tol, (name, max_rel_err(res[name].cpu(), ref[name]))
