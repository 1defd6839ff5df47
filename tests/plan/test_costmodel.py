"""The analytic cost model reproduces the published ratios it documents, and scales as the algorithms do."""
import pytest

from lsp.plan.costmodel import Hardware, format_plan, plan, ratio, step_time

M = 2**20


def test_published_ratios():
    assert ratio("allgather", "allscan", 256, 8 * M) == pytest.approx(1.6, abs=0.03)      # ZeCO paper
    assert ratio("ring", "allgather", 64, 2048 * 1024) == pytest.approx(1.152, abs=0.02)  # LASP-2 paper


def test_ratio_depends_on_the_network():
    """Negative control: with a 10x faster network the ZeCO advantage at 256 GPUs mostly disappears."""
    assert ratio("allgather", "allscan", 256, 8 * M, hw=Hardware(bandwidth=180e9)) < 1.3


def test_bytes_scaling():
    # LASP-2 receives (W-1) states per pass, the contiguous All-Scan chain (W-1)/W on average, independent of T
    for W in (8, 64):
        a, b = step_time("allgather", W, 8 * M), step_time("allgather", W, M)
        assert a.comm_bytes_per_gpu == b.comm_bytes_per_gpu
        assert step_time("allscan", W, 8 * M).comm_bytes_per_gpu * W == pytest.approx(a.comm_bytes_per_gpu)


def test_plan_sorted_and_formatted():
    rows = plan(256, 8 * M)
    assert [r["method"] for r in rows][0] == "allscan"
    assert all(x["total_s"] <= y["total_s"] for x, y in zip(rows, rows[1:]))
    assert "ZeCO All-Scan" in format_plan(rows)
    with pytest.raises(ValueError, match="method"):
        step_time("bogus", 8, M)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [2, 3, 4])
def test_modelled_bytes_are_what_the_code_sends(W, layout):
    """exchange_time's bytes per GPU equal the per-rank average comm_stats() counts for one pass of each method."""
    import torch

    from lsp.parallel import SPContext, comm_stats, reset_comm_stats
    from lsp.plan.costmodel import exchange_time
    from tests.parallel.cases import make_case, run_sp

    B, H, K, V = 2, 2, 8, 6
    for form, Kg in (("scalar", 1), ("key", K)):
        case = make_case(W, form, False, dtype=torch.float32, H=H, K=K, V=V)  # B = 2 rows
        for method in ("ring", "allgather", "allscan"):
            reset_comm_stats()
            run_sp(case, SPContext(emulate=W, layout=layout), method, scan_blocks=2)
            st = comm_stats()["by_tag_op"]
            got = sum(v["bytes_recv"] for k, v in st.items() if k.split("/")[0] == method) / W
            _, modelled = exchange_time(method, W, B * H * K * V * 4, 0.0, layout=layout,
                                        decay_bytes=B * H * Kg * 4, scan_blocks=2)
            assert got == pytest.approx(modelled, rel=1e-12), (method, form, got, modelled)
