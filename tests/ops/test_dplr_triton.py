"""dplr_delta_rule on backend="triton" (lsp/ops/dplr/triton_chunk.py) against the naive fp64 recurrence: outputs, final
states and the gradients of q, k, v, a, b, g and the initial state, with and without packed sequences; fla's ported
DPLR cases; the custom op on fake tensors; `auto` under the GPU measurement; negative controls.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before the kernels are
first imported), which is slow here (the per-key score kernels loop over a sub-block's 16 rows: ~20 s for one chunk
forward and backward on this CPU, shared), so the end-to-end T = 70-130 sweep is `slow` and the default suite runs
the DPLR's own kernels on one chunk with the scores from torch. Tolerance: fp32 inputs against the fp64 reference
1e-4 relative to each tensor's largest entry (every kernel product is full fp32, input_precision="ieee"; measured
5e-7 to 7e-7 at T = 70, K = V = 32).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from lsp.ops import dplr_delta_rule  # noqa: E402
from lsp.ops.dplr import api as dplr_api  # noqa: E402
from lsp.ops.estimate import gpu_code_paths  # noqa: E402

from .linear_cases import assert_close  # noqa: E402
from .test_dplr import NAMES, make_dplr_inputs, run_with_grads  # noqa: E402
from .test_dplr_fla_cases import _compare, fla_inputs  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
TOL = 1e-4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _op(backend):
    return lambda *args, **kw: dplr_delta_rule(*args, backend=backend, **kw)


def _on_device(x):
    return {n: t.detach().to(DEVICE).requires_grad_() for n, t in x.items()}


def _reference(x, **kw):
    return run_with_grads(_op("naive"), {n: t.detach().double().requires_grad_() for n, t in x.items()}, **kw)


def _forward(x, backend, **kw):
    with torch.no_grad():
        o, s = dplr_delta_rule(*(x[n] for n in NAMES[:-1]), initial_state=x["initial_state"],
                               output_final_state=True, backend=backend, **kw)
    return {"o": o.double().cpu(), "final_state": s.double().cpu()}


def _packed(cu):
    return {} if cu is None else {"cu_seqlens": torch.tensor(cu, dtype=torch.int32, device=DEVICE)}


@pytest.mark.slow
@pytest.mark.parametrize("B,T,K,V,cu", [
    (1, 70, 32, 32, None),                      # two chunks, the second partial
    (2, 70, 64, 32, None),
    (1, 130, 32, 64, [0, 10, 10, 64, 65, 130]),  # inside a chunk, empty, on a chunk edge, one token long
    (1, 100, 64, 64, [0, 37, 100]),
])
def test_triton_equals_recurrence(B, T, K, V, cu):
    """Outputs, final states and every input's gradient (fp32 kernels) equal the fp64 recurrence."""
    # one head: the interpreter runs every (chunk, head) program in turn (~2-5 min a case on this shared CPU)
    x = make_dplr_inputs(B=B, T=T, H=1, K=K, V=V, dtype=torch.float32, n_seq=None if cu is None else len(cu) - 1)
    got = run_with_grads(_op("triton"), _on_device(x), **_packed(cu))
    ref = _reference(x, **({} if cu is None else {"cu_seqlens": torch.tensor(cu, dtype=torch.int32)}))
    assert_close({n: t.cpu() for n, t in got.items()}, ref, TOL, f"triton B={B} T={T} K={K} V={V} cu={cu}")


@pytest.mark.slow
def test_triton_without_initial_state():
    """No initial state: the kernels' zero entering state, and no dinit."""
    x = make_dplr_inputs(B=1, T=70, H=1, K=32, V=32, dtype=torch.float32)
    q, k, v, a, b, g = (x[n] for n in NAMES[:-1])
    o, s = dplr_delta_rule(q, k, v, a, b, g, output_final_state=True, backend="triton")
    ref_o, ref_s = dplr_delta_rule(*(t.detach().double() for t in (q, k, v, a, b, g)), output_final_state=True,
                                   backend="naive")
    assert_close({"o": o.detach(), "s": s.detach()}, {"o": ref_o, "s": ref_s}, TOL)


@pytest.fixture
def torch_scores(monkeypatch):
    """The four per-key score matrices from chunk.py's torch `intra_scores_key` instead of the linear op's kernel
    (tested in tests/ops/test_triton.py; under the interpreter it is most of the run time), so that the default
    suite runs the DPLR's own kernels (WY inverse, WY apply, output) and the chunk scan on a small case."""
    from lsp.ops.dplr import triton_chunk
    from lsp.ops.linear.chunk import intra_scores_key

    def scores(qp, kp, bp, a_next, G):
        NC = qp.shape[1] // 64
        chunked = lambda x: triton_chunk._to_chunk_layout(x.float(), NC)  # noqa: E731
        pair = lambda x, y: triton_chunk._to_padded_layout(intra_scores_key(chunked(x), chunked(y), chunked(G)))  # noqa: E731
        return pair(qp, bp), pair(qp, kp), pair(a_next, bp), pair(a_next, kp)

    monkeypatch.setattr(triton_chunk, "_scores", scores)


@pytest.mark.parametrize("cu", [None, [0, 7, 20]])
def test_dplr_kernels_forward_one_chunk(torch_scores, cu):
    """The default suite's small version: one chunk (two packed sequences in it), forward, the DPLR's kernels."""
    x = make_dplr_inputs(B=1, T=20, H=1, K=32, V=32, dtype=torch.float32, n_seq=None if cu is None else len(cu) - 1)
    ref = _forward({n: t.double() for n, t in x.items()}, "naive",
                   **({} if cu is None else {"cu_seqlens": torch.tensor(cu, dtype=torch.int32)}))
    assert_close(_forward(_on_device(x), "triton", **_packed(cu)), ref, TOL, f"one chunk cu={cu}")


def test_negative_control_wrong_sign_of_b_fails(torch_scores):
    """The same comparison with b negated on the kernel side (the low-rank term written with the wrong sign)
    fails: the tolerance catches a wrong term."""
    x = make_dplr_inputs(B=1, T=20, H=1, K=32, V=32, dtype=torch.float32)
    ref = _forward({n: t.double() for n, t in x.items()}, "naive")
    wrong = {**x, "b": -x["b"]}
    with pytest.raises(AssertionError):
        assert_close(_forward(_on_device(wrong), "triton"), ref, TOL)


@pytest.mark.slow
def test_negative_control_wrong_strict_scores_fail(monkeypatch):
    """The WY solve reading the inclusive scores of a against b (a_t against b_t itself, one token too far) instead
    of the strict ones fails the same comparison: the kernels' shift of a is what the tolerance checks."""
    from lsp.ops.dplr import triton_chunk

    scores = triton_chunk._scores
    monkeypatch.setattr(triton_chunk, "_scores", lambda qp, kp, bp, a_next, G: scores(
        qp, kp, bp, torch.roll(a_next, 1, dims=1).contiguous(), G))
    x = make_dplr_inputs(B=1, T=70, H=1, K=32, V=32, dtype=torch.float32)
    with pytest.raises(AssertionError):
        assert_close(_forward(_on_device(x), "triton"), _forward({n: t.double() for n, t in x.items()}, "naive"),
                     TOL)


# fla's DPLR cases (tests/ops/test_dplr_fla_cases.py, fla's shapes and tolerances) on the Triton kernels: the small
# first case of each group
@pytest.mark.slow
def test_fla_recurrent_fwd_case_on_triton():
    with torch.no_grad():
        leaves = [t.detach() for t in fla_inputs(1, 63, 1, 64, torch.float, normalizer=16.0)]
    _compare(leaves, 1, with_grads=False, tol_o=0.001, tol=0.001, backend="triton")


@pytest.mark.slow
def test_fla_chunk_case_on_triton():
    _compare(fla_inputs(1, 63, 1, 64, torch.float16, 1, 0), 1, backend="triton")


@pytest.mark.slow
def test_fla_chunk_varlen_case_on_triton():
    cu = torch.tensor([0, 15], dtype=torch.int32)
    _compare(fla_inputs(1, 15, 4, 64, torch.float16, n_seq=1), None, cu=cu, backend="triton")


def test_custom_op_on_fake_tensors():
    """Fake tensors (what `lsp plan --measure` runs on) see `lsp::dplr_delta_rule` and its backward with the real
    op's shapes and dtypes; `auto` measures the Triton path under `gpu_code_paths()`."""
    B, T, H, K, V = 1, 70, 2, 16, 8
    with FakeTensorMode(), gpu_code_paths():
        q, k, a, b, g = (torch.randn(B, T, H, K, requires_grad=True) for _ in range(5))
        v = torch.randn(B, T, H, V, requires_grad=True)
        h0 = torch.randn(B, H, K, V, requires_grad=True)
        assert dplr_api.resolve_dplr_backend("auto", q.device) == "triton"
        o, s = dplr_delta_rule(q, k, v, a, b, g, initial_state=h0, output_final_state=True)
        assert (o.shape, o.dtype, s.shape, s.dtype) == ((B, T, H, V), q.dtype, (B, H, K, V), torch.float32)
        grads = torch.autograd.grad(o.sum() + s.sum(), (q, k, v, a, b, g, h0))
        assert [gr.shape for gr in grads] == [x.shape for x in (q, k, v, a, b, g, h0)]


def test_flop_counter_counts_the_op_with_its_formulas():
    """FlopCounterMode (what `lsp plan --measure` reads) counts the custom op and its backward by
    `dplr_chunk_flops` on fake tensors: forward scores + wy + scan + output, backward the same recomputed + grads."""
    from torch.utils.flop_counter import FlopCounterMode

    from lsp.ops.dplr.custom_ops import dplr_chunk_flops, register_flop_formulas

    register_flop_formulas()
    B, T, H, K, V = 1, 70, 2, 32, 16
    c = dplr_chunk_flops(K, V)
    want = B * H * 2 * (2 * (c["scores"] + c["wy"] + c["scan"]) + c["output"] + c["grads"])   # two chunks a head
    with FakeTensorMode(), gpu_code_paths(), FlopCounterMode(display=False) as counter:
        q, k, a, b, g = (torch.randn(B, T, H, K, requires_grad=True) for _ in range(5))
        v = torch.randn(B, T, H, V, requires_grad=True)
        o, s = dplr_delta_rule(q, k, v, a, b, g, output_final_state=True)
        (o.sum() + s.sum()).backward()
    assert counter.get_total_flops() == want > 0


def test_fp64_and_empty_inputs_run_the_torch_path():
    """fp64 inputs (the score kernels accumulate in fp32) and T == 0 (no kernel grid) run chunk.py: the fp64 result
    equals the recurrence to 1e-10."""
    x = make_dplr_inputs(B=1, T=5, H=1, K=8, V=4)
    assert_close(_forward(x, "triton"), _forward(x, "naive"), 1e-10)
    empty = {n: t[:, :0] if n != "initial_state" else t for n, t in make_dplr_inputs(B=1, T=3, H=1, K=8, V=4,
                                                                                      dtype=torch.float32).items()}
    got = _forward(empty, "triton")
    assert got["o"].shape == (1, 0, 1, 4) and torch.equal(got["final_state"], empty["initial_state"].double())
