"""Kimi Delta Attention (a gate per key channel) on the Triton kernels, against the naive fp64 recurrence.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before the kernels are
first imported): shapes stay tiny (the 16-row per-key kernels loop over rows; T = 70, one head of 32 in the default
suite, T = 130-150, K, V up to 64 and fla's shapes `slow`). Tolerances (norm-relative, as
tests/ops/test_delta_triton.py): fp32 inputs against the fp64 reference 1e-4 (the kernels' products are full fp32,
input_precision="ieee"); fp64 1e-9 where every product is fp64 (the chunk scan; fp64 inputs with a gate per key run
the torch chunk math around it); 16-bit inputs a few roundings of the input dtype; fla's own cases at fla's
ratios (tests/ops/test_fla_cases.py). Negative controls: the per-head mean of g in place of the per-key g, and
backward kernels that drop one term, fail the same tolerance.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from lsp.ops import delta_rule  # noqa: E402
from lsp.ops.delta import triton_chunk, triton_key, triton_scan  # noqa: E402
from lsp.ops.delta.chunk import chunk_forward  # noqa: E402

from . import test_fla_cases as fla  # noqa: E402
from .delta_cases import make_delta_inputs, max_rel_err, run_delta_with_grads  # noqa: E402
from .linear_cases import assert_close  # noqa: E402
from .test_delta_triton import CU, DEVICE, TOL, _DropArgument, _on_device, _ref  # noqa: E402
from .test_delta_triton_kernels import launches  # noqa: E402,F401 (the launch-counting fixture)
from .triton_interp import interpreter_bf16_dot  # noqa: E402,F401 (bf16 dots computed as a GPU does)


def _cpu(res):
    return {n: t.cpu() for n, t in res.items()}


def _torch_path_with_triton_scan(q, k, v, beta, g, initial_state=None, output_final_state=False, cu_seqlens=None):
    # the chunked torch path (UT transform and outputs in torch, autograd) with the chunk scan in Triton: the piece
    # sequence parallelism runs
    return chunk_forward(q, k, v, beta, g, q.shape[-1] ** -0.5, initial_state, output_final_state, cu_seqlens,
                         scan_backend="triton")


@pytest.mark.parametrize("varlen", [False, True])
def test_triton_chunk_scan_takes_a_decay_per_key(varlen):
    """The Triton chunk scan with a decay vector per key channel (forward and its reverse chain) inside the
    chunked torch path: outputs, final states and every gradient equal the naive recurrence (fp64: every product
    of the scan in fp64)."""
    kw = {"cu_seqlens": CU} if varlen else {}
    x = make_delta_inputs(True, B=1 if varlen else 2, T=150 if varlen else 130, K=16, V=24, per_key=True,
                          n_seq=5 if varlen else None)
    res = run_delta_with_grads(_torch_path_with_triton_scan, _on_device(x),
                               **({"cu_seqlens": CU.to(DEVICE)} if varlen else {}))
    assert_close(_cpu(res), _ref(x, **kw), TOL[torch.float64], f"per-key scan varlen={varlen}")


def test_negative_control_scan_with_the_mean_decay_is_caught(monkeypatch):
    """A scan that decays the state by the mean of the key channels' decays (what a kernel reading one decay per
    head would do) fails the same comparison."""
    x = make_delta_inputs(True, T=130, K=16, V=16, per_key=True)
    scan = triton_scan.scan_forward
    mean = lambda Kd, Wk, U, decay, *a: scan(Kd, Wk, U, decay.mean(-1, keepdim=True).expand_as(decay).contiguous(),  # noqa: E731
                                             *a)
    monkeypatch.setattr(triton_scan, "scan_forward", mean)
    with pytest.raises(AssertionError):
        assert_close(_cpu(run_delta_with_grads(_torch_path_with_triton_scan, _on_device(x))), _ref(x),
                     TOL[torch.float64])



def _kda(T=70, K=32, V=32, init=True, varlen=False, groups=1, dtype=torch.float32, H=1, B=1):
    # per-key inputs (and the cu_seqlens keyword): one row of two chunks, the second partial, by default
    n_seq = len(CU) - 1 if varlen else None
    x = make_delta_inputs(True, B=1 if varlen else B, T=150 if varlen else T, H=H, K=K, V=V,
                          dtype=dtype, init=init, per_key=True, n_seq=n_seq, groups=groups)
    return x, ({"cu_seqlens": CU} if varlen else {})


def _check_triton(x, kw, tol, what):
    dev_kw = {n: t.to(DEVICE) for n, t in kw.items()}
    res = run_delta_with_grads(delta_rule, _on_device(x), backend="triton", **dev_kw)
    assert_close(_cpu(res), _ref(x, **kw), tol, what)
    return res


@pytest.mark.parametrize("init,varlen,groups", [(True, False, 1), (True, False, 2),
                                               pytest.param(False, False, 1, marks=pytest.mark.slow)])
def test_triton_matches_naive(init, varlen, groups):
    """The whole op in Triton kernels (UT transform on the decayed key scores, scan, outputs and every backward
    kernel), fp32 against the fp64 recurrence: outputs, final states and the gradients of q, k, v, beta, g and the
    initial state; HV = 2·H value heads on the kernels (q, k repeated per value head before them)."""
    x, kw = _kda(init=init, varlen=varlen, groups=groups)
    _check_triton(x, kw, TOL[torch.float32], f"KDA init={init} varlen={varlen} G={groups}")


@pytest.mark.slow
@pytest.mark.parametrize("K,V,T,init,varlen,groups", [(32, 32, 130, True, False, 1), (64, 64, 130, True, False, 1),
                                                      (32, 64, 100, False, False, 2), (64, 32, 150, True, True, 1),
                                                      (32, 32, 150, True, True, 2)])
def test_triton_matches_naive_larger(K, V, T, init, varlen, groups):
    """Three chunks, K, V in {32, 64} (one and two K blocks in the 16-row kernels), packed sequences (CU: a
    boundary inside a chunk, on a chunk edge, an empty sequence, one of length 1), grouped value heads."""
    x, kw = _kda(T=T, K=K, V=V, init=init, varlen=varlen, groups=groups, H=2, B=2)
    _check_triton(x, kw, TOL[torch.float32], f"KDA K={K} V={V} T={T} varlen={varlen} G={groups}")


def test_fp64_inputs_are_exact():
    """fp64 with a gate per key: the torch chunk math around the Triton scan, fp64 throughout (1e-9)."""
    x, kw = _kda(dtype=torch.float64, K=16, V=16)
    _check_triton(x, kw, TOL[torch.float64], "KDA fp64")


def test_bf16_inputs():
    """bf16 operands (T, the states, the decayed keys of the 16-row kernels rounded to bf16, as fla), fp32
    accumulation; tolerance as tests/ops/test_delta_triton.py's bf16 case: a few bf16 roundings (2^-8)."""
    x, _ = _kda(dtype=torch.bfloat16)
    res = run_delta_with_grads(delta_rule, _on_device(x), backend="triton")
    assert res["o"].dtype == torch.bfloat16 and res["final_state"].dtype == torch.float32
    ref = _ref(x)
    errors = {n: max_rel_err(res[n].cpu(), ref[n]) for n in ref}
    assert max(errors.values()) < 2e-2, errors


def test_negative_control_per_head_mean_gate_is_caught():
    """The kernels run on the per-head mean of g (a gate per head, what KDA is not): outputs and gradients miss the
    per-key reference by far more than the tolerance."""
    x, _ = _kda()
    mean = {**x, "g": x["g"].detach().mean(-1, keepdim=True).expand_as(x["g"]).contiguous()}
    res = run_delta_with_grads(delta_rule, _on_device(mean), backend="triton")
    with pytest.raises(AssertionError):
        assert_close(_cpu(res), _ref(x), TOL[torch.float32])


@pytest.mark.parametrize("wrong", ["decay gradient of the chunk", "pair products' gradients"])
def test_negative_control_backward_without_a_term_is_caught(monkeypatch, wrong):
    """A backward that forgets the chunk decay's gradient (the key kernel's ddec zeroed) or the gradients of the
    16-row pair products (Akk and P) fails the comparison."""
    x, _ = _kda()
    ref = _ref(x)
    if wrong.startswith("decay"):
        monkeypatch.setattr(triton_chunk, "_bwd_k_key_kernel", _DropArgument(triton_key._bwd_k_key_kernel, 9))
    else:
        monkeypatch.setattr(triton_chunk, "key_intra_grads", lambda *a: None)
    with pytest.raises(AssertionError):
        assert_close(_cpu(run_delta_with_grads(delta_rule, _on_device(x), backend="triton")), ref, TOL[torch.float32])


# fla's KDA cases (tests/ops/test_fla_cases.py) on the kernels: the first at fla's size, the rest cut to T <= 128
FLA_KDA = [pytest.param(*fla.KDA_CHUNK[0], id="fla-" + "-".join(map(str, fla.KDA_CHUNK[0])))] + [
    pytest.param(*fla._cut(c), id="fla-short-" + "-".join(map(str, c)), marks=pytest.mark.slow)
    for c in fla.KDA_CHUNK[1:]]


@pytest.mark.parametrize("B,T,H,D,scale,normaliser,mask_p,l2norm_in_kernel,gate_in_kernel", FLA_KDA)
def test_fla_kda_chunk_cases_on_triton(monkeypatch, B, T, H, D, scale, normaliser, mask_p, l2norm_in_kernel,
                                       gate_in_kernel):
    """fla's test_chunk (fp16 inputs, its gate normalisers, masking and the KDA gate) at fla's error ratios, the
    op on backend="triton" (lsp's naive recurrence the reference, as there)."""
    run = fla._run
    monkeypatch.setattr(fla, "_run", lambda *a, backend, **kw: run(*a, backend="triton" if backend == "torch"
                                                                   else backend, **kw))
    fla.test_kda_chunk(B, T, H, D, scale, normaliser, mask_p, l2norm_in_kernel, gate_in_kernel)


def test_launches_do_not_grow_with_T(launches):  # noqa: F811 (the imported fixture)
    """Forward 6 launches (Akk, the inverse, apply, scan, P, output), forward + backward 18 (the backward recomputes
    Akk, the inverse, apply, scan and P, then the output's gradients, the reverse scan, the W, dA and per-key key
    kernels and the two 16-row gradient kernels), the same at 1 and 3 chunks and for packed sequences; torch adds
    only elementwise work (G's cumsum, exp(G_C), the reverse cumsum of dG and key_intra_grads' sums)."""
    counts = {}
    for T in (64, 192):
        x, _ = _kda(T=T, K=16, V=16)
        x = _on_device({n: t.detach() for n, t in x.items()})
        launches.clear()
        o, s = delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"],
                          output_final_state=True, backend="triton")
        counts[T, "forward"] = len(launches)
        (o.float().sum() + s.sum()).backward()
        counts[T, "backward"] = len(launches) - counts[T, "forward"]
    assert counts == {(64, "forward"): 6, (192, "forward"): 6, (64, "backward"): 12, (192, "backward"): 12}, counts


def test_sp_with_triton_scan(monkeypatch):
    """sp_delta_rule with a gate per key channel on the Triton scan (the augmented [M | S] scan with a decay per
    key included), ring method, zigzag layout, packed sequences, HV = 2·H: equals the naive recurrence, gradients
    included."""
    from lsp.ops.delta import chunk as chunk_mod
    from lsp.parallel import SPContext
    from tests.parallel.cases import max_rel_err as sp_err
    from tests.parallel.delta_cases import delta_reference, make_delta_case, run_sp_delta

    calls, scan = [], chunk_mod._triton_scan
    monkeypatch.setattr(chunk_mod, "_triton_scan", lambda ch, *a: calls.append(ch.decay.dim()) or scan(ch, *a))
    case = make_delta_case(2, True, True, K=16, V=16, per_key=True, groups=2)
    err = sp_err(run_sp_delta(case, SPContext(emulate=2, layout="zigzag"), "ring", backend="triton"),
                 delta_reference(case, backend="naive"))
    assert calls and set(calls) == {4} and max(err.values()) < 1e-10, (calls, err)
