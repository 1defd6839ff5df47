"""sp_dplr_delta_rule with backend="triton": the chunk scans of the SP pass (the local maps on the augmented state
and the entering states, 2C rows and a decay per key channel) run in the delta rule's Triton scan
(`lsp::delta_chunk_scan`), the WY solve and the outputs in batched torch. Every method equals the naive fp64
recurrence (outputs, final states, the gradients of every input) under the Triton interpreter without CUDA.

Tolerance 1e-9 (norm-relative): fp64 inputs make every product of the scan fp64 (as tests/ops/test_kda_triton.py);
the negative control, a scan that decays by the mean of the key channels' decays, is off by far more.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from lsp.ops.delta import triton_scan  # noqa: E402
from lsp.parallel import DELTA_METHODS, SPContext  # noqa: E402

from .cases import max_rel_err  # noqa: E402
from .dplr_cases import dplr_reference, make_dplr_case, run_sp_dplr  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
TOL = 1e-9


@pytest.mark.parametrize("method", DELTA_METHODS)
def test_sp_dplr_on_the_triton_scan(method):
    case = make_dplr_case(2, True)
    err = max_rel_err(run_sp_dplr(case, SPContext(emulate=2, layout="zigzag"), method, backend="triton"),
                      dplr_reference(case))
    assert max(err.values()) < TOL, (method, err)


def test_negative_control_mean_decay_scan_fails(monkeypatch):
    scan = triton_scan.scan_forward
    mean = lambda Kd, Wk, U, decay, *a: scan(Kd, Wk, U, decay.mean(-1, keepdim=True).expand_as(decay).contiguous(),  # noqa: E731
                                             *a)
    monkeypatch.setattr(triton_scan, "scan_forward", mean)
    case = make_dplr_case(2, True)
    err = max_rel_err(run_sp_dplr(case, SPContext(emulate=2, layout="zigzag"), "allscan", backend="triton"),
                      dplr_reference(case))
    assert err["o"] > 1e-3, err
