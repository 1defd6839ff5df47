"""Smoke tests of the benchmark scripts (--quick), so they cannot rot, plus checks of what they measure."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import e2e  # noqa: E402
import hybrid_ratio  # noqa: E402
import profile_step  # noqa: E402
import softmax_sp  # noqa: E402


def test_saved_bytes_counts_activations_not_parameters():
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(10, 64, requires_grad=True)
    with e2e.SavedBytes(lin) as counter:
        y = torch.tanh(lin(x))                      # saves x (linear) and y (tanh), not the weight
    assert counter.total == x.numel() * 4 + y.numel() * 4
    with e2e.SavedBytes(lin) as counter:
        lin(x.detach())                             # nothing requires grad but the weight: saves x only
    assert counter.total == x.numel() * 4
    with e2e.SavedBytes(lin) as counter:
        pass
    lin(x).sum()                                    # outside the context: not counted
    assert counter.total == 0


def test_e2e_quick(tmp_path):
    rows, emu = e2e.main(["--quick", "--plot", str(tmp_path / "e2e")])
    assert {(r["pattern"], r["W"]) for r in rows} == {("LLLS", 1), ("LLLS", 2), ("L", 1), ("L", 2)}
    for r in rows:
        assert r["step_s"] > 0 and 0 < r["MFU_%"] < 100 and r["act_MB/rank"] > 0
        # the state exchange exists only with SP; K,V are gathered only by softmax layers
        assert (r["recv_MB state"] > 0) == (r["W"] > 1)
        assert (r["recv_MB K,V"] > 0) == (r["W"] > 1 and "S" in r["pattern"])
    assert os.path.exists(tmp_path / "e2e_scaling.png")
    assert emu and emu[0]["ratio W=2/W=1"] > 0


def test_profile_step_quick():
    out = profile_step.main(["--quick", "--baseline", "HEAD"])
    shares = sum(r["share_%"] for r in out["split"])
    assert 99 <= shares <= 101
    assert any(r["op"] == "aten::mm" for r in out["top"]) or out["split"][0]["ms"] > 0
    assert {"lsp.forward", "lsp.backward", "lsp.optimizer", "lsp.attn.L"} <= {r["range"] for r in out["components"]}
    assert list(out["compare"][0].values())[-1] > 0


def test_baseline_loader_gives_the_committed_chunk_module():
    import lsp.ops.linear.chunk as current
    old = profile_step.load_chunk_module("HEAD")
    q, k, v = (torch.randn(1, 40, 2, 8, dtype=torch.float64) for _ in range(3))
    g = -torch.rand(1, 40, 2, 8, dtype=torch.float64)
    a = old.chunk_linear_attention(q, k, v, g, 8 ** -0.5)[0]
    b = current.chunk_linear_attention(q, k, v, g, 8 ** -0.5)[0]
    torch.testing.assert_close(a, b)
    with pytest.raises(subprocess.CalledProcessError):
        profile_step.load_chunk_module("no-such-revision-xyz")


def test_hybrid_ratio_matches_parameters():
    args = argparse.Namespace(hidden=64, layers=8, heads=2, linear_attn="gla", match_params=True)
    from lsp.models import HybridLM, num_parameters
    count = lambda p, a: num_parameters(HybridLM(hybrid_ratio.matched_config(p, 129, a)))  # noqa: E731
    target = count("L", args)
    for pat in ("LLLS", "LS", "S"):
        assert abs(count(pat, args) - target) / target < 0.01
    unmatched = argparse.Namespace(**{**vars(args), "match_params": False})
    assert abs(count("S", unmatched) - target) / target > 0.05  # the mismatch the matching removes


def test_hybrid_ratio_quick(tmp_path):
    rows = hybrid_ratio.main(["--quick", "--plot", str(tmp_path / "h.png")])
    assert [r["pattern"] for r in rows] == ["LLLS", "S"]
    assert all(0.0 <= r["recall_acc"] <= 1.0 for r in rows)
    assert os.path.exists(tmp_path / "h.png")


def test_softmax_sp_quick():
    """SP softmax with and without packed documents agrees with single-device attention, and packed documents
    keep exactly what the causal case keeps for backward (no mask)."""
    causal, packed = softmax_sp.main(["--quick"])
    assert causal["max rel diff"] < 1e-5 and packed["max rel diff"] < 1e-5
    assert packed["docs"] == 8 and packed["saved MB/rank"] == causal["saved MB/rank"] > 0
    assert causal["fwd+bwd ms/rank"] > 0 and packed["fwd+bwd ms/rank"] > 0
