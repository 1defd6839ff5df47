"""GPU readiness of the delta rule's Triton kernels without a GPU (the pattern of test_triton_sm90.py): every kernel
`delta_rule(backend="triton")` launches, forward and backward (with and without decay and initial state, bf16 at
d = 64 and 128, fp16 at 128), compiled for sm_90a (H100) and sm_80 (A100) by Triton and ptxas, must use no spill
memory, and on sm_90a every kernel with chunk-level (64-row) dots must use wgmma; only the 16-row UT inverse
(`_ut_inverse_kernel`, 16x16 dots as fla's solve_tril) may use mma.sync. Negative control: the key-gradient kernel
with K and V blocks of 64 (720 B per thread spilled, measured) must be reported as spilling by the same parser. The
default suite compiles, for sm_80, the three kernels whose configs spilled there (the output kernel 844 B, the W
and dA kernels 8 / 68 B).

A gate per key channel (KDA, `_exercise_kda`: bf16 at d = 64 and 128, fp16 at 128, with and without initial
state) launches the same kernels with KEY=True, the linear op's 16-row score kernels (`_intra_scores_kernel`,
`_intra_dqk_kernel`, which may use mma.sync as in test_triton_sm90.py) and `_bwd_k_key_kernel`: the same
assertions, slow; the default suite compiles the per-key key kernel and the KEY output kernel for sm_80.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from lsp.ops import delta_rule  # noqa: E402
from lsp.ops.delta import triton_intra  # noqa: E402

from .delta_cases import make_delta_inputs  # noqa: E402
from .sm90_compile import capture_launches, ptxas_path  # noqa: E402
from .test_triton_sm90 import _assert_clean, _assert_sm80_clean, _compile  # noqa: E402

pytestmark = [
    pytest.mark.skipif(type(triton_intra._out_kernel).__name__ != "InterpretedFunction",
                       reason="captures launches under TRITON_INTERPRET=1"),
    pytest.mark.skipif(ptxas_path() is None, reason="needs ptxas"),
]


def _exercise():
    for d, dtype in ((64, torch.bfloat16), (128, torch.bfloat16), (128, torch.float16)):
        for gated, init in ((True, True), (True, False), (False, True), (False, False)):
            x = make_delta_inputs(gated, B=1, T=64, H=1, K=d, V=d, dtype=dtype, init=init)
            o, s = delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"],
                              output_final_state=True, backend="triton")
            (o.float().sum() + s.sum()).backward()


def _exercise_kda(shapes=((64, torch.bfloat16), (128, torch.bfloat16), (128, torch.float16)), inits=(True, False)):
    for d, dtype in shapes:
        for init in inits:
            x = make_delta_inputs(True, B=1, T=64, H=1, K=d, V=d, dtype=dtype, init=init, per_key=True)
            o, s = delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"],
                              output_final_state=True, backend="triton")
            (o.float().sum() + s.sum()).backward()


SUB_BLOCK_KERNELS = {"_ut_inverse_kernel", "_intra_scores_kernel", "_intra_dqk_kernel"}


def test_sm80_kda_key_and_output_kernels(tmp_path):
    exercise = lambda: _exercise_kda(((64, torch.bfloat16),), (False,))  # noqa: E731
    assert _assert_sm80_clean(exercise, {"_bwd_k_key_kernel", "_out_kernel"}, tmp_path) == 2


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_kda_kernel_compiles_without_spills(tmp_path, arch):
    items = capture_launches(_exercise_kda)
    rows = _compile(items, tmp_path, arch)
    _assert_clean(items, rows, arch, {
        "_intra_scores_kernel", "_ut_inverse_kernel", "_ut_apply_kernel", "_scan_fwd", "_out_kernel",
        "_bwd_out_kernel", "_scan_bwd", "_bwd_w_kernel", "_bwd_dA_kernel", "_bwd_k_key_kernel", "_intra_dqk_kernel"},
        SUB_BLOCK_KERNELS)


def test_sm80_defaults_of_the_delta_kernels_that_spilled_there(tmp_path):
    def exercise():
        x = make_delta_inputs(True, B=1, T=64, H=1, K=64, V=64, dtype=torch.bfloat16, init=False)
        o, s = delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], output_final_state=True, backend="triton")
        (o.float().sum() + s.sum()).backward()
    assert _assert_sm80_clean(exercise, {"_out_kernel", "_bwd_w_kernel", "_bwd_dA_kernel"}, tmp_path) == 3


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_delta_kernel_compiles_without_spills(tmp_path, arch):
    items = capture_launches(_exercise)
    rows = _compile(items, tmp_path, arch)
    _assert_clean(items, rows, arch, {
        "_ut_inverse_kernel", "_ut_apply_kernel", "_scan_fwd", "_out_kernel", "_bwd_out_kernel", "_scan_bwd",
        "_bwd_w_kernel", "_bwd_dA_kernel", "_bwd_k_kernel"}, {"_ut_inverse_kernel"})
    bad = next(it for it in items if it[1] == "_bwd_k_kernel")
    bad = [bad[0], bad[1], bad[2], {**bad[3], "BK": 64, "BV": 64}, bad[4], bad[5]]
    assert _compile([bad], tmp_path, arch)[0]["spill"] > 0
