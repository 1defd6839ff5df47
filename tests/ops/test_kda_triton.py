"""Kimi Delta Attention (a gate per key channel) on the Triton kernels, against the naive fp64 recurrence.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before the kernels are
first imported): shapes stay tiny. Tolerances (norm-relative, as tests/ops/test_delta_triton.py): fp32 inputs
against the fp64 reference 1e-4 (the kernels' products are full fp32, input_precision="ieee"); fp64 1e-9 where
every product is fp64 (the chunk scan).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from lsp.ops import delta_rule  # noqa: E402
from lsp.ops.delta import triton_scan  # noqa: E402
from lsp.ops.delta.chunk import chunk_forward  # noqa: E402

from .delta_cases import detached64, make_delta_inputs, run_delta_with_grads  # noqa: E402
from .linear_cases import assert_close  # noqa: E402

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CU = torch.tensor([0, 10, 10, 64, 65, 150], dtype=torch.int32)   # inside a chunk, a chunk edge, empty, length 1


def _ref(x, **kw):
    return run_delta_with_grads(delta_rule, detached64(x), backend="naive", **kw)


def _on_device(x):
    return {n: None if t is None else t.detach().to(DEVICE).requires_grad_() for n, t in x.items()}


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


@pytest.mark.parametrize("init,varlen", [(True, False), (False, False), (True, True)])
def test_triton_matches_naive(init, varlen):
    """The whole op in Triton kernels (UT transform on the decayed key scores, scan, outputs and every backward
    kernel), fp32 against the fp64 recurrence: outputs, final states and the gradients of q, k, v, beta, g and the
    initial state."""
    kw = {"cu_seqlens": CU} if varlen else {}
    x = make_delta_inputs(True, B=1 if varlen else 2, T=150 if varlen else 130, K=32, V=32, dtype=torch.float32,
                          init=init, per_key=True, n_seq=5 if varlen else None)
    res = run_delta_with_grads(delta_rule, _on_device(x), backend="triton",
                               **({"cu_seqlens": CU.to(DEVICE)} if varlen else {}))
    assert_close(_cpu(res), _ref(x, **kw), TOL[torch.float32], f"KDA init={init} varlen={varlen}")
