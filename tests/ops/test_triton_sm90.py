"""GPU readiness of the Triton kernels without a GPU: every kernel the op launches (forward and backward, every decay
form, bf16 and fp16, head dims 64, 128 and 256, and a value head narrower than the key head) is compiled for sm_90a
(H100) and sm_80 (A100) by Triton's compiler and ptxas, and must use no spill memory; on sm_90a every kernel with
chunk-level (64-row) dots must use wgmma. Only the per-key kernels that work on 16-row sub-blocks by design (as fla's
intra-chunk kernels) may use mma.sync. The default suite compiles the two kernels whose defaults spilled on sm_80
(192 B and 40-60 B per thread) and the K != V case that did not compile at all.

The kernels are captured under the interpreter (tests/ops/sm90_compile.py) and compiled in a child process without
it. Negative control: a config known to spill (the 16-row per-key dq/dk kernel with K blocks of 64 and 4 warps,
1148 B per thread measured) must be reported as spilling by the same parser.

fp32 inputs are not in this test: their dots run exact fp32 FMA (no tensor cores) unless LSP_TRITON_TF32=1, and
some of those kernels spill (docs/ops.md lists them); the performance path is 16-bit inputs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from lsp.ops import linear_attention  # noqa: E402
from lsp.ops.linear.triton_chunk import kern  # noqa: E402

from .linear_cases import make_inputs  # noqa: E402
from .sm90_compile import capture_launches, ptxas_path  # noqa: E402

SUB_BLOCK_KERNELS = {"_intra_scores_kernel", "_intra_dqk_kernel"}
ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.skipif(type(kern._fwd_state_kernel).__name__ != "InterpretedFunction",
                       reason="captures launches under TRITON_INTERPRET=1"),
    pytest.mark.skipif(ptxas_path() is None, reason="needs ptxas"),
]


def _run(form, K, V, dtype=torch.bfloat16, inits=(True, False)):
    q, k, v, g, s0 = make_inputs(form, B=1, T=64, H=1, K=K, V=V, dtype=dtype)
    for init in inits:   # with and without an initial state: they compile to different kernels
        o, s = linear_attention(q, k, v, g, initial_state=s0 if init else None, output_final_state=True,
                                backend="triton")
        (o.float().sum() + s.sum()).backward()


def _exercise():
    shapes = ((64, 64, torch.bfloat16), (128, 128, torch.bfloat16), (256, 256, torch.bfloat16),
              (128, 128, torch.float16), (64, 16, torch.bfloat16))
    for K, V, dtype in shapes:
        for form in ("none", "scalar", "key"):
            _run(form, K, V, dtype)


def _compile(items, tmp_path, arch=90):
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps(items))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-m", "tests.ops.sm90_compile", str(path), str(arch)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _assert_sm80_clean(exercise, wanted, tmp_path) -> int:
    """The launches of `wanted` kernels that `exercise` makes compile for sm_80 without spills (the default-suite
    check of kernels whose defaults once spilled there); -> how many distinct configs they were."""
    items = [it for it in capture_launches(exercise) if it[1] in wanted]
    rows = _compile(items, tmp_path, arch=80)
    assert len(rows) == len(items) and {r["name"] for r in rows} == wanted
    assert [r for r in rows if r["spill"] != 0] == []
    return len(rows)


def _assert_clean(items, rows, arch, names, may_use_mma_sync):
    """Every captured launch compiled, their kernels include `names`, none spills, and on sm_90a every dot kernel
    uses wgmma but those in may_use_mma_sync (16-row sub-block kernels: their products have no 64-row tile)."""
    assert len(rows) == len(items) and {r["name"] for r in rows} >= names
    for r in rows:
        print(f"{r['name']:22s} warps={r['warps']} regs={r['regs']} spill={r['spill']} "
              f"{'wgmma' if r['wgmma'] else 'mma.sync' if r['mma'] else 'no-dot'} {r['consts']}")
    spilling = [r for r in rows if r["spill"] != 0]
    assert not spilling, spilling
    if arch == 90:
        no_wgmma = [r for r in rows if r["mma"] and not r["wgmma"] and r["name"] not in may_use_mma_sync]
        assert not no_wgmma, no_wgmma


def test_sm80_defaults_of_the_kernels_that_spilled_there(tmp_path):
    """Small version for the default suite: the default configs of _out_kernel (scalar decay) and
    _state_dkdv_kernel (per-key decay, and a value head of 16 beside a key head of 64: blocks of different sizes)
    compile for sm_80 without spills."""
    def exercise():
        _run("scalar", 64, 64, inits=(False,))
        _run("key", 64, 64, inits=(False,))
        _run("key", 64, 16, inits=(False,))
    assert _assert_sm80_clean(exercise, {"_out_kernel", "_state_dkdv_kernel"}, tmp_path) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles_without_spills(tmp_path, arch):
    items = capture_launches(_exercise)
    rows = _compile(items, tmp_path, arch)
    _assert_clean(items, rows, arch, {"_fwd_state_kernel", "_out_kernel", "_intra_dqk_kernel", "_state_dkdv_kernel"},
                  SUB_BLOCK_KERNELS)
    # negative control: the parser sees spills when there are some
    bad = next(it for it in items if it[1] == "_intra_dqk_kernel")
    bad = [bad[0], bad[1], bad[2], {**bad[3], "BK": 64}, 4, bad[5]]
    assert _compile([bad], tmp_path, arch)[0]["spill"] > 0


def _exercise_dplr(shapes=((64, 64), (128, 128), (64, 16))):
    # the DPLR op's launches (lsp/ops/dplr/triton_chunk.py), forward and backward, bf16, with an initial state
    from lsp.ops import dplr_delta_rule

    for K, V in shapes:
        q, k, a, b = (torch.randn(1, 64, 1, K, dtype=torch.bfloat16, requires_grad=True) for _ in range(4))
        v = torch.randn(1, 64, 1, V, dtype=torch.bfloat16, requires_grad=True)
        g = (-torch.rand(1, 64, 1, K)).requires_grad_()
        o, s = dplr_delta_rule(q, k, v, a, b, g, initial_state=torch.zeros(1, 1, K, V), output_final_state=True,
                               backend="triton")
        (o.float().sum() + s.sum()).backward()


DPLR_KERNELS = {"_wy_inverse_kernel", "_wy_apply_kernel", "_out_kernel", "_bwd_out_kernel", "_bwd_scores_kernel",
                "_bwd_q_kernel", "_bwd_wy_scores_kernel", "_bwd_wy_ab_kernel", "_bwd_wy_kernel",
                "_scan_fwd", "_scan_bwd", "_intra_scores_kernel", "_intra_dqk_kernel"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_dplr_kernel_compiles_without_spills(tmp_path, arch):
    """Every kernel the DPLR op launches (its own, the linear op's per-key scores, the delta rule's scan on 2C
    rows), head dims 64, 128 and a value head of 16 beside a key head of 64: no spills; wgmma on sm_90a except the
    16-row sub-block kernels (the scores, and the WY inverse, whose 16 x 16 products have no 64-row tile)."""
    items = capture_launches(_exercise_dplr)
    rows = _compile(items, tmp_path, arch)
    assert {r["name"] for r in rows} == DPLR_KERNELS
    # the delta rule's forward scan at K = 128 with a decay per key channel and an initial state spilled 208 B per
    # thread on sm_80 with column blocks of 32; they are 16 at K = 128 now (lsp/ops/delta/triton_scan.py `_blocks`)
    _assert_clean(items, rows, arch, DPLR_KERNELS, SUB_BLOCK_KERNELS | {"_wy_inverse_kernel"})
