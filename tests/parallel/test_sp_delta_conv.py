"""sp_short_conv in emulation equals the op on the whole sequence (halo exchange, zero at document starts)."""
import pytest
import torch

from lsp.parallel import SPContext, comm_stats, reset_comm_stats
from lsp.parallel import delta as delta_mod

from .cases import max_rel_err
from .delta_cases import conv_case, conv_reference, run_sp_conv


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("W", [1, 2, 3, 4, 8])
def test_sp_conv_matches_op(W, varlen, layout):
    c = conv_case(W, varlen)
    err = max_rel_err(run_sp_conv(c, SPContext(emulate=W, layout=layout)), conv_reference(c))
    assert max(err.values()) < 1e-13, err


def test_halo_bytes():
    """Forward and backward each all-gather L·B·(k-1)·D values per rank: (W-1)·that received."""
    W, B, D, k = 4, 2, 5, 4
    c = conv_case(W, False)
    reset_comm_stats()
    run_sp_conv(c, SPContext(emulate=W, layout="zigzag"))
    stats = comm_stats()["by_tag_op"]
    for tag in ("delta_conv_halo", "delta_conv_halo:bwd"):
        assert stats[f"{tag}/all_gather"]["bytes_recv"] / W == (W - 1) * 2 * B * (k - 1) * D * 8


def test_negative_control_zero_halo_is_caught(monkeypatch):
    c = conv_case(3, False)
    monkeypatch.setattr(delta_mod.GatherTails, "apply", lambda token, tails, sp: torch.zeros_like(tails))
    err = max_rel_err(run_sp_conv(c, SPContext(emulate=3, layout="zigzag")), conv_reference(c))
    assert err["y"] > 1e-2
