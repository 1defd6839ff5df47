"""sp_delta_rule on real gloo ranks: exact for every method and layout (KDA with grouped value heads included),
packed documents crossing ranks, frozen ranks still join the backward collectives, and the all-gather moves
exactly the counted bytes."""
import pytest

from lsp.parallel import spawn

from . import delta_cases


@pytest.mark.parametrize("W", [2, 3])
def test_gloo_delta_rule(W):
    B, H, K, V = 2, 2, 8, 6
    results = spawn(delta_cases.gloo_delta, W, timeout_s=240)
    for res in results:
        bad = {k: e for k, e in res["errors"].items() if not e < 1e-10}
        assert not bad, bad
        # contiguous, fp32: every rank receives the other W-1 [M | S] blocks forward and W-1 gE blocks backward
        assert res["recv"] == (W - 1) * B * H * K * (K + V) * 4
        assert res["recv_bwd"] == (W - 1) * B * H * K * (K + V) * 4   # [M | gE]: the maps travel again
    # only rank 0 trains: the frozen ranks still ran the backward collectives, rank 0's gradients are exact
    frozen = results[0]["frozen"]
    assert frozen and max(frozen.values()) < 1e-10, frozen


def test_gloo_frozen_ranks_need_the_participation_token():
    errors = spawn(delta_cases.gloo_frozen_without_token, 2, timeout_s=30)
    assert "does not require grad" in errors[1], errors
    assert errors[0] != "no error", errors
