"""The analytic cost model reproduces the published ratios it documents, and scales as the algorithms do."""
import pytest

from lsp.parallel.costmodel import Hardware, format_plan, plan, ratio, step_time

M = 2**20


def test_published_ratios():
    assert ratio("lasp2", "allscan", 256, 8 * M) == pytest.approx(1.6, abs=0.03)      # ZeCO paper
    assert ratio("lasp1", "lasp2", 64, 2048 * 1024) == pytest.approx(1.152, abs=0.02)  # LASP-2 paper


def test_ratio_depends_on_the_network():
    """Negative control: with a 10x faster network the ZeCO advantage at 256 GPUs mostly disappears."""
    assert ratio("lasp2", "allscan", 256, 8 * M, hw=Hardware(bandwidth=180e9)) < 1.3


def test_bytes_scaling():
    # LASP-2 moves (W-1) states per pass, All-Scan one, independent of T
    for W in (8, 64):
        a, b = step_time("lasp2", W, 8 * M), step_time("lasp2", W, M)
        assert a.comm_bytes_per_gpu == b.comm_bytes_per_gpu
        assert step_time("allscan", W, 8 * M).comm_bytes_per_gpu * (W - 1) == a.comm_bytes_per_gpu


def test_plan_sorted_and_formatted():
    rows = plan(256, 8 * M)
    assert [r["method"] for r in rows][0] == "allscan"
    assert all(x["total_s"] <= y["total_s"] for x, y in zip(rows, rows[1:]))
    assert "ZeCO All-Scan" in format_plan(rows)
    with pytest.raises(ValueError, match="method"):
        step_time("bogus", 8, M)
