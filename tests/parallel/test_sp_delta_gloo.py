"""sp_delta_rule on real gloo ranks: exact for every method and layout, packed documents crossing ranks, frozen
ranks still join the backward collectives, and the all-gather moves exactly the counted bytes."""
import pytest

from lsp.parallel import spawn

from . import delta_cases


@pytest.mark.parametrize("W", [2, 3])
def test_gloo_delta_rule(W):
    B, H, K, V = 2, 2, 8, 6
    for res in spawn(delta_cases.gloo_delta, W, timeout_s=240):
        bad = {k: e for k, e in res["errors"].items() if not e < 1e-10}
        assert not bad, bad
        # contiguous, fp32: every rank receives the other W-1 [M | S] blocks forward and W-1 gE blocks backward
        assert res["recv"] == (W - 1) * B * H * K * (K + V) * 4
        assert res["recv_bwd"] == (W - 1) * B * H * K * V * 4


def test_gloo_frozen_ranks_join_the_backward():
    errors = spawn(delta_cases.gloo_frozen, 3, timeout_s=240)[0]
    assert max(errors.values()) < 1e-10, errors


def test_gloo_frozen_ranks_need_the_participation_token():
    with pytest.raises(RuntimeError, match="does not require grad"):
        spawn(delta_cases.gloo_frozen_without_token, 2, timeout_s=30)
