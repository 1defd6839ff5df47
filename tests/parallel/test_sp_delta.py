"""sp_delta_rule in emulation: every method x layout x packing x W equals the single-device delta_rule."""
import pytest
import torch

from lsp.ops import delta_rule
from lsp.parallel import DELTA_METHODS, SPContext, comm_stats, reset_comm_stats, sp_delta_rule
from lsp.parallel import affine as affine_mod
from lsp.parallel import delta as delta_mod
from lsp.parallel.linear import Shape

from .cases import max_rel_err
from .delta_cases import delta_reference, make_delta_case, run_sp_delta

LAYOUTS = ("contiguous", "zigzag")


def _check_all(W, varlen, dtype, tol, T_per_rank=32):
    for gated in (False, True):
        case = make_delta_case(W, gated, varlen, dtype=dtype, T_per_rank=T_per_rank)
        ref = delta_reference(case)
        for layout in LAYOUTS:
            for method in DELTA_METHODS:
                err = max_rel_err(run_sp_delta(case, SPContext(emulate=W, layout=layout), method), ref)
                assert max(err.values()) < tol, (W, varlen, gated, layout, method, err)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("W", [1, 2, 3, 4, 8])
def test_matrix_fp64(W, varlen):
    _check_all(W, varlen, torch.float64, 1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_general_path_at_w1(layout):
    """sp_delta_rule runs the op at W = 1; the map-and-exchange path must give the same there too."""
    case = make_delta_case(1, True, True)
    sp = SPContext(emulate=1, layout=layout)
    x = {n: case[n] for n in ("q", "k", "v", "beta", "g")}
    T = x["q"].shape[1]
    shape = Shape(1, sp.segments_per_rank, 1, sp.segment_length(T), x["q"].shape[2], x["q"].shape[3],
                  x["v"].shape[-1])
    o, f = delta_mod._sp_delta(*x.values(), sp, "allgather", 8 ** -0.5, case["h0"], True, case["cu"], 4, shape)
    o_ref, f_ref = delta_rule(*x.values(), initial_state=case["h0"], output_final_state=True, cu_seqlens=case["cu"])
    assert max_rel_err({"o": o, "f": f}, {"o": o_ref, "f": f_ref})["o"] < 1e-12
    assert max_rel_err({"f": f}, {"f": f_ref})["f"] < 1e-12


def test_segments_longer_than_a_chunk():
    """Zigzag segments of 80 tokens cross a chunk edge (C = 64)."""
    _check_all(2, True, torch.float64, 1e-10, T_per_rank=160)


@pytest.mark.parametrize("W", [2, 3])
def test_matrix_fp32(W):
    _check_all(W, True, torch.float32, 1e-5)


@pytest.mark.parametrize("method", DELTA_METHODS)
def test_negative_control_transposed_map_fails(method, monkeypatch):
    """Composing the prefix with M_iᵀ instead of M_i (a wrong prefix) must break the comparison."""
    case = make_delta_case(3, True, False)
    ref = delta_reference(case)
    flipped = staticmethod(lambda A, X, transpose=False: (A if transpose else A.transpose(-1, -2)) @ X)
    monkeypatch.setattr(affine_mod.DenseMaps, "apply", flipped)
    err = max_rel_err(run_sp_delta(case, SPContext(emulate=3, layout="zigzag"), method), ref)
    assert err["o"] > 1e-3


def test_negative_control_wrong_layout_fails():
    case = make_delta_case(2, True, False)
    sp = SPContext(emulate=2, layout="zigzag")
    got = run_sp_delta(case, sp, "allgather")
    wrong = SPContext(emulate=2, layout="contiguous").gather(sp.shard(got["o"]))
    assert (wrong - delta_reference(case)["o"]).abs().max() > 1e-3


def _bytes_per_rank(W, layout, method, T_per_rank, B=2, H=2, K=8, V=6):
    case = make_delta_case(W, True, False, dtype=torch.float32, T_per_rank=T_per_rank, H=H, K=K, V=V)
    reset_comm_stats()
    run_sp_delta(case, SPContext(emulate=W, layout=layout), method)
    stats = comm_stats()["by_tag_op"]
    recv = lambda tag: sum(v["bytes_recv"] for k, v in stats.items() if k.split("/")[0] == tag) / W  # noqa: E731
    return recv(f"delta_{method}"), recv(f"delta_{method}:bwd")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_comm_bytes_match_formula_and_do_not_grow_with_T(layout):
    """allgather: (W-1)·L·B·H·K·(K+V)·4 bytes each way ([M | S] forward, [M | gE] backward: the maps travel again
    instead of being kept, so nothing O(W) outlives the forward); ring / contiguous allscan: one B·H·K·V state per
    chain edge that crosses ranks, each way; zigzag allscan: the two half chains (W-1 states each, the second with
    its composed K x K map) and the tree broadcast of the midpoint state (W-1 states)."""
    W, B, H, K, V = 4, 2, 2, 8, 6
    L = 2 if layout == "zigzag" else 1
    cross_edges = {"contiguous": W - 1, "zigzag": 2 * W - 2}[layout]  # zigzag: the middle edge stays on rank W-1
    for T_per_rank in (16, 64):
        assert _bytes_per_rank(W, layout, "allgather", T_per_rank) == (
            (W - 1) * L * B * H * K * (K + V) * 4, (W - 1) * L * B * H * K * (K + V) * 4)
        state, dense_map = B * H * K * V * 4, B * H * K * K * 4
        for method in ("ring", "allscan"):
            fwd, bwd = _bytes_per_rank(W, layout, method, T_per_rank)
            half_chains = method == "allscan" and layout == "zigzag"
            want = (W - 1) * (3 * state + dense_map) if half_chains else cross_edges * state
            assert fwd * W == bwd * W == want, (layout, method, fwd, bwd)


def test_numerics_ignore_autocast():
    case = make_delta_case(2, True, True, dtype=torch.float32)
    sp = SPContext(emulate=2, layout="zigzag")
    plain = run_sp_delta(case, sp, "allgather")
    cast = run_sp_delta(case, sp, "allgather", autocast=True)
    assert all(torch.equal(cast[n], plain[n]) for n in plain)


def test_frozen_inputs_still_give_the_trainable_gradients():
    case = make_delta_case(3, True, True)
    got = run_sp_delta(case, SPContext(emulate=3, layout="zigzag"), "ring", frozen=("k", "v", "g", "h0"))
    ref = delta_reference(case)
    names = ("o", "q", "beta")
    assert max(max_rel_err({n: got[n] for n in names}, {n: ref[n] for n in names}).values()) < 1e-10


@pytest.mark.parametrize("kwargs,match", [({"method": "tree"}, "method must be one of"),
                                          ({"backend": "naive"}, "backend must be 'auto', 'torch' or 'triton'")])
def test_bad_arguments_name_the_argument(kwargs, match):
    case = make_delta_case(2, True, False)
    sp = SPContext(emulate=2)
    with pytest.raises(ValueError, match=match):
        sp_delta_rule(*(sp.shard(case[n]) for n in ("q", "k", "v", "beta", "g")), sp=sp, **kwargs)
