"""`lsp train` on the tiny Gated DeltaNet config: a short run whose loss goes down."""
import json
import os

from .conftest import REPO, SMALL, run_lsp

GDN = os.path.join(REPO, "configs", "tiny-gdn-cpu.yaml")


def test_tiny_gdn_config_trains(tmp_path):
    steps = 100
    res = run_lsp("train", GDN, *SMALL, f"out_dir={tmp_path}", f"train.steps={steps}", "parallel.sp=1",
                  "checkpoint.every=0")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "tiny-gdn-cpu" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == steps
    # from ln(vocab) ~ 4.4 at init to the "uniform over the 64 values" plateau ln(64) ~ 4.16 within 100 steps
    # (measured 4.36 -> 4.17); a model that learns nothing stays at ~4.4
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.1, (first, last)
