"""benchmarks/scale.py (docs/benchmarks_scale.md) runs end to end on the tiny configs: it measures, writes the JSON,
reads it back into the tables and draws the plot; the named baselines it prints are the cost model's formulas."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import scale  # noqa: E402

from lsp.plan.costmodel import fla_cp_bytes, megatron_a2a_bytes  # noqa: E402


def test_scale_quick_measures_writes_and_plots(tmp_path, capsys):
    path = tmp_path / "scale.json"
    measured, rows = scale.main(["--quick", "--measure", "2", "--models", "GDN hybrid", "--json", str(path),
                                 "--plot", str(tmp_path / "scale.png")])
    assert list(json.loads(path.read_text())) == ["GDN hybrid/2"] == list(measured)
    got, model = measured["GDN hybrid/2"], rows["GDN hybrid", 2]
    assert got["peak_gb"] == pytest.approx(model["peak_gb"], rel=0.15)
    assert got["tflops"] == pytest.approx(model["tflops"], rel=0.05)
    assert got["comm_mb"]["kv_gather"] == pytest.approx(model["comm_mb"]["kv_gather"])
    assert os.path.getsize(tmp_path / "scale.png") > 0
    out = capsys.readouterr().out
    assert f"| 2 | 64 | {model['method']} / {model['softmax_method']} | {got['peak_gb']:.2f} |" in out
    unmeasured = next(line for line in out.splitlines() if line.startswith("| 4 | 128 |"))
    assert unmeasured.split(" | ")[3] == "—"                   # W = 4 not measured: modelled only


def test_named_baselines():
    # fla CP: every other rank's K·(K+V) per head, fp32, forward and backward; Megatron: (W-1)/W of q, k, v, o
    assert fla_cp_bytes(4, 2, 8, 16) == 2 * 3 * 2 * 8 * 24 * 4
    assert megatron_a2a_bytes(4, 10, 2, 8, 16) == pytest.approx(2 * 0.75 * 10 * 2 * (3 * 8 + 16) * 2)
    assert fla_cp_bytes(1, 2, 8, 16) == 0 == megatron_a2a_bytes(1, 10, 2, 8, 16)
