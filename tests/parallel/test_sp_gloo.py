"""Real multi-process runs over gloo: a representative subset must equal the single-device ops exactly."""
import pytest

from lsp.parallel import spawn

from . import workers


@pytest.mark.parametrize("W", [2, 3, 4, pytest.param(8, marks=pytest.mark.slow)])
def test_gloo_linear_and_softmax(W):
    results = spawn(workers.both, W, timeout_s=240)
    B, H, K, V = 2, 2, 8, 6
    for linear, softmax, red in results:
        assert red == {"sum": 2 * W * (W + 1) / 2, "grad": 2.0, "gather_ok": True, "gather_grad_ok": True}
        bad = {k: e for k, e in linear["errors"].items() if not e < 1e-10}
        assert not bad, bad
        assert linear["err32"] < 1e-5
        # LASP-2 contiguous: every rank receives the other W-1 states and scalar decays, nothing more
        assert linear["allgather_recv"] == (W - 1) * (B * H * K * V * 4 + B * H * 4)
        assert all(e < 1e-10 for e in softmax.values()), softmax


def test_spawn_reports_failing_rank():
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed.*boom from rank one"):
        spawn(workers.fail_on_rank_one, 2, timeout_s=60)
