"""Smoke test of benchmarks/delta.py (--quick), so it cannot rot."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import delta  # noqa: E402


def test_delta_benchmark_quick():
    rows, sp_rows = delta.main(["--quick"])
    assert len(rows) == 4 and all(r["torch_ms"] > 0 and r["naive_ms"] > 0 for r in rows)
    assert len(sp_rows) == 2 and all(r["op_ms"] > 0 and r["emu W=2 zigzag/op"] > 0 for r in sp_rows)


def test_delta_benchmark_key_gate_quick():
    rows, sp_rows = delta.main(["--quick", "--gates", "key", "--no-naive", "--no-sp"])
    assert [r["gate"] for r in rows] == ["key", "key"] and all(r["torch_ms"] > 0 for r in rows) and sp_rows == []
