"""sp_delta_rule with a gate per key channel (Kimi Delta Attention) and with grouped value heads: every method x
layout x packing x W equals the single-device step-by-step recurrence in fp64 (outputs and the gradients of q, k,
v, beta, g and the initial state).

Tolerance 1e-10 (norm-relative): the SP path composes the same affine maps in another order (measured ~6e-16); a
map whose per-key decay is dropped or transposed is off by O(1e-1) (the negative controls).
"""
import pytest
import torch

from lsp.ops.delta import chunk as chunk_mod
from lsp.parallel import DELTA_METHODS, SPContext, sp_delta_rule

from .cases import max_rel_err
from .delta_cases import delta_reference, make_delta_case, run_sp_delta

LAYOUTS = ("contiguous", "zigzag")
TOL = 1e-10


def _worst(case, W, layout, method):
    got = run_sp_delta(case, SPContext(emulate=W, layout=layout), method)
    return max_rel_err(got, delta_reference(case, backend="naive"))


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("W", [2, 3, 4])
def test_key_gate_matrix_fp64(W, varlen):
    case = make_delta_case(W, True, varlen, per_key=True)
    for layout in LAYOUTS:
        for method in DELTA_METHODS:
            err = _worst(case, W, layout, method)
            assert max(err.values()) < TOL, (W, varlen, layout, method, err)


@pytest.mark.parametrize("per_key", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_grouped_value_heads_fp64(varlen, per_key):
    """q, k with H = 2 heads, v, beta, g, h0 with HV = 4: each value head reads q/k head j // 2."""
    case = make_delta_case(3, True, varlen, per_key=per_key, groups=2)
    assert case["q"].shape[2] == 2 and case["v"].shape[2] == 4
    for layout in LAYOUTS:
        for method in DELTA_METHODS:
            err = _worst(case, 3, layout, method)
            assert max(err.values()) < TOL, (varlen, per_key, layout, method, err)


def test_key_gate_segments_longer_than_a_chunk():
    """Zigzag segments of 80 tokens cross a chunk edge (C = 64) and several 16-token sub-blocks."""
    case = make_delta_case(2, True, True, T_per_rank=160, per_key=True, groups=2)
    for method in DELTA_METHODS:
        assert max(_worst(case, 2, "zigzag", method).values()) < TOL, method


def test_key_gate_fp32():
    case = make_delta_case(3, True, True, dtype=torch.float32, per_key=True)
    for method in DELTA_METHODS:
        assert max(_worst(case, 3, "zigzag", method).values()) < 1e-5, method


def test_world_size_one_is_the_op():
    case = make_delta_case(1, True, True, per_key=True, groups=2)
    assert max(_worst(case, 1, "zigzag", "allgather").values()) < TOL


def test_negative_control_scalar_decay_instead_of_per_key_fails(monkeypatch):
    """A chunk scan that decays the state by the key channels' mean instead of per channel must be caught."""
    case = make_delta_case(3, True, False, per_key=True)
    monkeypatch.setattr(chunk_mod, "_as_state_factor",
                        lambda d: (d[..., None, None] if d.dim() == 3 else d.mean(-1, keepdim=True)[..., None]))
    err = _worst(case, 3, "zigzag", "allgather")
    assert err["o"] > 1e-3


def test_negative_control_wrong_group_order_fails():
    """Value head j reading q/k head j % H (repeat instead of repeat_interleave) is a different model."""
    case = make_delta_case(2, True, False, per_key=True, groups=2)
    ref = delta_reference(case, backend="naive")
    wrong = {**case, "q": case["q"].repeat(1, 1, 2, 1), "k": case["k"].repeat(1, 1, 2, 1)}
    sp = SPContext(emulate=2, layout="zigzag")
    o, _ = sp_delta_rule(*(sp.shard(wrong[n]) for n in ("q", "k", "v", "beta", "g")), sp=sp, initial_state=case["h0"],
                         cu_seqlens=case["cu"])
    assert max_rel_err({"o": sp.gather(o)}, {"o": ref["o"]})["o"] > 1e-3


@pytest.mark.parametrize("bad,match", [
    ({"v": "heads3"}, r"v's heads HV=3 must be a multiple G·H of the H=2 heads of q and k"),
    ({"g": "wrongK"}, r"g \(log-decay\) must be None, \[B, T, HV\]"),
])
def test_bad_arguments_name_the_argument(bad, match):
    case = make_delta_case(2, True, False, per_key=True)
    sp = SPContext(emulate=2)
    x = {n: sp.shard(case[n]) for n in ("q", "k", "v", "beta", "g")}
    if bad.get("v"):
        x["v"] = torch.cat([x["v"], x["v"][:, :, :1]], dim=2)
    if bad.get("g"):
        x["g"] = x["g"][..., :5]
    with pytest.raises(ValueError, match=match):
        sp_delta_rule(*x.values(), sp=sp)
