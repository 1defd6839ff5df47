"""benchmarks/mqar_kinds.py: the quick run trains every registered kind, every model is matched to one parameter
target (the all-linear GLA model) whatever its kind, and the per-run cache makes a rerun train only what it
lacks for the same settings."""
import argparse
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import hybrid_ratio  # noqa: E402
import mqar_kinds  # noqa: E402

from lsp.models import HybridLM, layer_kinds, num_parameters  # noqa: E402


def test_mqar_kinds_quick(tmp_path):
    rows = mqar_kinds.main(["--quick", "--plot", str(tmp_path / "m.png")])
    assert [r["linear_attn"] for r in rows] == [mqar_kinds.REFERENCE, *layer_kinds()]
    assert [r["pattern"] for r in rows] == ["S"] + ["L"] * len(layer_kinds())
    assert all(0.0 <= r["recall_acc"] <= 1.0 for r in rows)
    assert os.path.exists(tmp_path / "m.png")


def _count(pattern: str, args) -> int:
    return num_parameters(HybridLM(hybrid_ratio.matched_config(pattern, 97, args)))


@pytest.mark.parametrize("kind", layer_kinds())
def test_every_kind_matches_the_gla_parameter_target(kind):
    """The study's model (2 layers, d=64; and 4 for a 3:1 hybrid): the models of every kind within 2% of the all-GLA
    model,
    whether the kind has fewer mixer weights than GLA (a wider MLP) or more (kda: a narrower one)."""
    for layers, patterns in ((2, ("L", "LS")), (4, ("L", "LLLS"))):
        args = argparse.Namespace(hidden=64, layers=layers, heads=2, linear_attn=kind, match_params=True,
                                  match_kind="gla")
        target = _count("L", argparse.Namespace(**{**vars(args), "linear_attn": "gla"}))
        for pattern in patterns:
            assert abs(_count(pattern, args) - target) / target < 0.02, (kind, layers, pattern)


def test_unmatched_kinds_differ_by_more_than_the_matching_leaves():
    # control: without matching, the all-linear models of two kinds differ by more than 2% (what matching removes)
    args = argparse.Namespace(hidden=64, layers=4, heads=2, match_params=False)
    counts = [_count("L", argparse.Namespace(**vars(args), linear_attn=k)) for k in ("kda", "hgrn2")]
    assert abs(counts[0] - counts[1]) / counts[1] > 0.05


def test_the_cache_is_reused_only_for_the_same_settings(tmp_path, monkeypatch):
    cache = tmp_path / "runs.jsonl"
    argv = ["--quick", "--plot", "", "--kinds", "gla,linear", "--cache", str(cache)]
    first = mqar_kinds.main(argv)
    assert len(cache.read_text().splitlines()) == 3   # softmax reference, gla, linear
    trained = []
    real = hybrid_ratio.train_one
    monkeypatch.setattr(hybrid_ratio, "train_one", lambda *a: trained.append(a[0]) or real(*a))
    assert mqar_kinds.main(argv) == first and trained == []              # everything from the cache
    mqar_kinds.main(argv[:-3] + ["gla,linear,simple_gla", "--cache", str(cache)])
    assert trained == ["L"]                                              # only the added kind is trained
    trained.clear()
    mqar_kinds.main(argv + ["--lr", "1e-3"])                             # other settings: nothing reused
    assert trained == ["S", "L", "L"]
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(rows) == 7 and len({r["setup"] for r in rows}) == 2      # the earlier runs are kept
