"""`lsp train` on the tiny configs of the mamba2, hgrn2 and rwkv7 kinds: a short run whose loss goes down."""
import json
import os

import pytest

from .conftest import REPO, SMALL, run_lsp


@pytest.mark.parametrize("kind", ["mamba2", "hgrn2", "rwkv7"])
def test_tiny_kind_config_trains(tmp_path, kind):
    steps = 60
    config = os.path.join(REPO, "configs", f"tiny-{kind}-cpu.yaml")
    res = run_lsp("train", config, *SMALL, f"out_dir={tmp_path}", f"train.steps={steps}", "parallel.sp=1",
                  "checkpoint.every=0")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / f"tiny-{kind}-cpu" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == steps
    # as tests/train/test_delta_train.py: from ln(vocab) ~ 4.4 at init towards the ln(64) ~ 4.16 plateau (measured
    # on this CPU, mean of the first / last 10 steps: mamba2 4.39 -> 4.23, hgrn2 4.38 -> 4.22, rwkv7 4.39 -> 4.25); a
    # model that learns nothing stays at ~4.4
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.1, (first, last)
