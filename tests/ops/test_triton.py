"""The Triton backend against the step-by-step naive reference (outputs and every gradient).

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before triton is imported),
which is slow: shapes stay tiny. The `gpu` test runs larger shapes on CUDA.

Tolerances (norm-relative, max|a-b| / max|b|):
- fp32 inputs vs the fp64 naive reference: 1e-4 (5e-4 for dg of [H] decay). The kernels accumulate in fp32 (unit
  roundoff 6e-8); sums of <= 150 O(1) terms give ~1e-6 measured. dg of a per-head decay sums every token's chunk-local
  dg (themselves sums of q ⊙ dq - k ⊙ dk over the chunk, with cancellation) in fp64: 2.4e-6 (T=77, K=16) and 9.5e-5
  (T=150, K=72, V=100) measured with the Triton 3.9 interpreter (2.3e-4 with the former whole-sequence identity).
  A wrong term (a dropped decay, a state from the wrong chunk or sequence) gives errors of O(1e-1) and fails, see the
  negative controls.
- bf16 / fp16 inputs vs the fp32 torch path on the same rounded values: 1e-2 (bf16), 1e-3 (fp16); measured (T=40)
  o 4.1e-3 / 5.1e-3 (bf16 scalar / key), 8.4e-4 (fp16), gradients <= 4.3e-3 (bf16), 9.6e-4 (fp16). Besides the
  rounding of o and the input gradients to the input dtype (relative step 2^-8 = 4e-3 for bf16, 2^-11 for fp16) the
  kernels round decayed dot operands (q ⊙ exp(G), A, dA) to the input dtype, as fla does, and run_with_grads rounds
  its loss weights to the output dtype. The final state is fp32 from exact inputs: 1e-5 (measured 2.2e-6, bf16; the
  forward scan splits its decayed key into two 16-bit parts for this, see triton_kernels._fwd_state_kernel).
  Under the interpreter, bf16 dots and casts go through tests/ops/triton_interp.py (the interpreter's own bf16 dot
  is wrong and its cast rounds toward zero).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # read when the kernels are decorated, i.e. when triton_kernels is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from lsp.ops import linear_attention  # noqa: E402
from lsp.ops.linear.triton_chunk import kern  # noqa: E402
from lsp.ops.probe import triton_available  # noqa: E402

from .linear_cases import DECAY_FORMS, assert_close, make_inputs, max_rel_err, run_with_grads  # noqa: E402
from .triton_interp import interpreter_bf16_dot  # noqa: E402,F401

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = type(kern._fwd_state_kernel).__name__ == "InterpretedFunction"
pytestmark = pytest.mark.skipif(
    not triton_available(DEVICE) or (DEVICE.type == "cpu" and not INTERPRETED),
    reason="no CUDA, and the Triton kernels were imported without TRITON_INTERPRET=1 before this module set it",
)
TOL32 = 1e-4


def _to(x, dtype=None, device=DEVICE):
    return None if x is None else x.detach().to(device=device, dtype=dtype or x.dtype).requires_grad_(True)


def _ref(q, k, v, g, s0, backend="naive", dtype=torch.float64, **kw):
    res = run_with_grads(linear_attention, *(_to(x, dtype, "cpu") for x in (q, k, v, g, s0)), backend=backend, **kw)
    return {key: val.to(torch.float64) for key, val in res.items()}


def _triton(q, k, v, g, s0, **kw):
    cu = kw.pop("cu_seqlens", None)
    cu = None if cu is None else cu.to(DEVICE)
    res = run_with_grads(linear_attention, *(_to(x) for x in (q, k, v, g, s0)), backend="triton", cu_seqlens=cu, **kw)
    return {key: val.cpu() for key, val in res.items()}


def _tol(form, key):
    return 5e-4 if (form == "head" and key == "dg") else TOL32


def _check(res, ref, form, what):
    assert res.keys() == ref.keys(), (res.keys(), ref.keys())
    for key in ref:
        err = max_rel_err(res[key], ref[key])
        assert err <= _tol(form, key), f"{what} {key}: relative error {err:.3e} > {_tol(form, key):.1e}"


# -- Triton against the naive reference ---------------------------------------------------------------------------

@pytest.mark.parametrize("form", DECAY_FORMS)
@pytest.mark.parametrize("T,K,V,init", [(45, 8, 6, True), (77, 16, 8, False)])
def test_triton_matches_naive(form, T, K, V, init):
    # T=45: one partial chunk; T=77: two chunks, the second partial (odd T, K != V)
    q, k, v, g, s0 = make_inputs(form, B=2, T=T, H=2, K=K, V=V, dtype=torch.float32, init=init)
    res = _triton(q, k, v, g, s0)
    assert res["o"].dtype == torch.float32 and res["final_state"].dtype == torch.float32
    _check(res, _ref(q, k, v, g, s0), form, f"{form} T={T} K={K} V={V}")


@pytest.mark.parametrize("form", DECAY_FORMS)
def test_triton_varlen(form):
    # boundaries inside a chunk (10, 70), an empty sequence, a sequence of length 1, per-sequence initial states
    cu = torch.tensor([0, 10, 10, 70, 71, 80], dtype=torch.int32)
    q, k, v, g, s0 = make_inputs(form, B=1, T=80, H=2, K=8, V=16, dtype=torch.float32, n_seq=5)
    _check(_triton(q, k, v, g, s0, cu_seqlens=cu), _ref(q, k, v, g, s0, cu_seqlens=cu), form, f"varlen {form}")


def test_triton_state_blocks_and_partial_losses():
    """V > 64 splits the state passes into V blocks; a loss on the final state only (no output gradient) and on the
    output only (no final-state gradient) both take their own branch of the backward."""
    q, k, v, g, s0 = make_inputs("key", B=1, T=20, H=1, K=8, V=70, dtype=torch.float32)
    _check(_triton(q, k, v, g, s0), _ref(q, k, v, g, s0), "key", "V=70")
    xs = [_to(x) for x in (q, k, v, g, s0)]
    refs = [_to(x, torch.float64, "cpu") for x in (q, k, v, g, s0)]
    for pick in (0, 1):
        outs = [linear_attention(*a[:4], initial_state=a[4], output_final_state=True, backend=b)[pick]
                for a, b in ((xs, "triton"), (refs, "naive"))]
        grads = [torch.autograd.grad(out.double().square().sum(), a, allow_unused=True)
                 for out, a in zip(outs, (xs, refs))]
        for got, want in zip(*grads):
            if want is None:  # q does not reach the final state: its gradient must be zero
                assert got is None or got.abs().max() == 0
            else:
                assert max_rel_err(got.cpu(), want) < TOL32, f"loss on output {pick}"


def test_triton_no_final_state_and_fp64_fallback():
    q, k, v, g, s0 = make_inputs("scalar", B=1, T=9, H=1, K=4, V=4, dtype=torch.float32, requires_grad=False)
    o, s = linear_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), g.to(DEVICE), backend="triton")
    assert s is None and o.shape == (1, 9, 1, 4)
    q, k, v, g, s0 = make_inputs("key", B=1, T=30, H=1, K=4, V=4, dtype=torch.float64)
    res = run_with_grads(linear_attention, q, k, v, g, s0, backend="triton")
    assert_close(res, _ref(q, k, v, g, s0), 1e-10, "fp64 fallback")


@pytest.mark.parametrize("form,dtype", [("scalar", torch.bfloat16), ("key", torch.bfloat16), ("head", torch.float16)])
def test_triton_half(form, dtype):
    q, k, v, g, s0 = make_inputs(form, B=1, T=40, H=2, K=16, V=16, dtype=dtype)
    res = _triton(q, k, v, g, s0)
    assert res["o"].dtype == dtype and res["dq"].dtype == dtype and res["dg"].dtype == dtype
    ref = _ref(q, k, v, g, s0, backend="torch", dtype=torch.float32)  # same bf16-rounded values, fp32 math
    for key in ref:
        err = max_rel_err(res[key], ref[key])
        tol = 1e-5 if key == "final_state" else (1e-2 if dtype == torch.bfloat16 else 1e-3)
        assert err < tol, f"{dtype} {form} {key}: relative error {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("form", ["head", "key"])
def test_negative_control_perturbed_decay(form):
    """A slightly different decay must not pass: the comparison can fail."""
    q, k, v, g, s0 = make_inputs(form, B=1, T=40, H=2, K=8, V=8, dtype=torch.float32)
    g_bad = (g.detach() * 1.05).requires_grad_(True)
    res = _triton(q, k, v, g_bad, s0)
    ref = _ref(q, k, v, g, s0)
    assert max_rel_err(res["o"], ref["o"]) > 10 * TOL32
    assert max_rel_err(res["final_state"], ref["final_state"]) > 10 * TOL32


@pytest.mark.parametrize("form", DECAY_FORMS)
def test_triton_larger_dims(form):
    # K, V > 64 and not powers of two: several state blocks and masked head dims; three chunks
    q, k, v, g, s0 = make_inputs(form, B=1, T=150, H=1, K=72, V=100, dtype=torch.float32)
    _check(_triton(q, k, v, g, s0), _ref(q, k, v, g, s0), form, f"large {form}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("form", DECAY_FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_large(form, dtype):
    """Realistic shapes on CUDA against the chunked torch path in fp64 (itself tested against naive)."""
    cu = torch.tensor([0, 300, 300, 1000, 2047], dtype=torch.int32)
    q, k, v, g, s0 = make_inputs(form, B=1, T=2047, H=4, K=128, V=64, dtype=dtype, n_seq=4)
    res = _triton(q, k, v, g, s0, cu_seqlens=cu)
    ref = _ref(q, k, v, g, s0, backend="torch", cu_seqlens=cu)
    for key in ref:
        err = max_rel_err(res[key], ref[key])
        tol = 1e-3 if dtype == torch.float32 else 3e-2
        assert err < tol, f"cuda {form} {dtype} {key}: relative error {err:.3e}"


@pytest.mark.parametrize("form", ["head", "scalar", "key"])
def test_triton_strong_decay(form):
    """g = -20 on every token (exp(g) = 2e-9: every state all but forgets its past). Per element, o, the final state
    and every gradient but dg are within 1e-4 relative (+ 1e-6 of the largest entry for entries near zero) of fp64
    (measured <= 2.3e-5, dq and dk). dg is not checked relatively: its true value is O(e^-20) (|dg| <= 4e-8) and it is
    a difference of O(1) terms (q ⊙ dq - k ⊙ dk, and autograd's exp-derivatives on the torch path), so fp32 roundoff
    of those terms (~1e-7) exceeds it; the torch path is off by 2.5 to 48 (norm-relative) there as well. Checked
    instead: finite, and within 1e-4 of max|q ⊙ dq| (measured 6.7e-5 absolute for [H], 2e-6 and 8e-7 otherwise)."""
    q, k, v, g, s0 = make_inputs(form, B=1, T=77, H=2, K=8, V=8, dtype=torch.float32)
    g = torch.full_like(g, -20.0).requires_grad_(True)
    res, ref = _triton(q, k, v, g, s0), _ref(q, k, v, g, s0)
    for key in ref:
        assert torch.isfinite(res[key]).all(), key
        err = (res[key].double() - ref[key]).abs()
        if key != "dg":
            bound = 1e-4 * ref[key].abs() + 1e-6 * ref[key].abs().max()
            assert (err <= bound).all(), f"{form} {key}: {(err / ref[key].abs()).max():.2e}"
    scale = (q.detach().double() * res["dq"].double()).abs().max()
    assert (res["dg"].double() - ref["dg"]).abs().max() <= 1e-4 * scale
