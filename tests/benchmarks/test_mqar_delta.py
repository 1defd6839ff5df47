"""benchmarks/mqar_delta.py: the quick run trains both linear kinds, and every model is matched to one parameter
target (the all-linear GLA model), whatever its linear kind."""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import hybrid_ratio  # noqa: E402
import mqar_delta  # noqa: E402


def test_mqar_delta_quick(tmp_path):
    rows = mqar_delta.main(["--quick", "--plot", str(tmp_path / "m.png")])
    assert [r["linear_attn"] for r in rows] == ["gla", "gated_deltanet"]
    assert all(0.0 <= r["recall_acc"] <= 1.0 for r in rows)
    assert os.path.exists(tmp_path / "m.png")


def test_gdn_models_match_the_gla_parameter_target():
    from lsp.models import HybridLM, num_parameters

    args = argparse.Namespace(hidden=64, layers=8, heads=2, linear_attn="gated_deltanet", match_params=True,
                              match_kind="gla")
    count = lambda p, a: num_parameters(HybridLM(hybrid_ratio.matched_config(p, 69, a)))  # noqa: E731
    target = count("L", argparse.Namespace(**{**vars(args), "linear_attn": "gla"}))
    for pat in ("L", "LLLS", "LS"):
        assert abs(count(pat, args) - target) / target < 0.015
    # control: the all-GDN model itself is not the GLA target (what matching to one target is for)
    own = argparse.Namespace(**{**vars(args), "match_kind": None})
    assert count("L", own) != target
