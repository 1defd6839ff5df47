"""sp_linear_attention in emulation: every method x decay form x layout x packing equals the single-device op."""
import pytest
import torch

from lsp.parallel import SPContext, comm_stats, reset_comm_stats, sp_linear_attention
from lsp.parallel import affine as affine_mod

from .cases import FORMS, METHODS, make_case, max_rel_err, reference, run_sp

LAYOUTS = ("contiguous", "zigzag")


def _check_all(W, varlen, dtype, tol):
    for form in FORMS:
        case = make_case(W, form, varlen, dtype=dtype)
        ref = reference(case)
        for layout in LAYOUTS:
            for method in METHODS:
                err = max_rel_err(run_sp(case, SPContext(emulate=W, layout=layout), method), ref)
                assert max(err.values()) < tol, (W, varlen, form, layout, method, err)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_matrix_fp64(W, varlen):
    _check_all(W, varlen, torch.float64, 1e-10)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("W", [2, 3])
def test_matrix_fp32(W, varlen):
    _check_all(W, varlen, torch.float32, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("varlen", [False, True])
def test_matrix_w8(varlen):
    _check_all(8, varlen, torch.float64, 1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_negative_control_dropped_decay_fails(method, monkeypatch):
    """Ignoring the cross-rank decay must break the comparison (the test can fail)."""
    case = make_case(3, "scalar", False)
    ref = reference(case)
    decay = affine_mod._decay
    monkeypatch.setattr(affine_mod, "_decay", lambda a, p: decay(None if a is None else torch.zeros_like(a), p))
    err = max_rel_err(run_sp(case, SPContext(emulate=3, layout="zigzag"), method), ref)
    assert err["o"] > 1e-3


def test_negative_control_wrong_layout_fails():
    """Gathering with the wrong layout puts tokens out of order: the comparison must fail."""
    case = make_case(2, "key", False)
    ref = reference(case)
    sp = SPContext(emulate=2, layout="zigzag")
    got = run_sp(case, sp, "allgather")
    wrong = SPContext(emulate=2, layout="contiguous").gather(sp.shard(got["o"]))
    assert (wrong - ref["o"]).abs().max() > 1e-3


def _bytes_per_rank(W, layout, method, T_per_rank, form="scalar", B=2, H=2, K=8, V=6):
    case = make_case(W, form, False, dtype=torch.float32, T_per_rank=T_per_rank)
    sp = SPContext(emulate=W, layout=layout)
    reset_comm_stats()
    run_sp(case, sp, method)
    stats = comm_stats()["by_tag_op"]
    fwd = {k: v for k, v in stats.items() if k.startswith(method + "/")}
    bwd = {k: v for k, v in stats.items() if k.startswith(method + ":bwd/")}
    recv = lambda d: sum(v["bytes_recv"] for v in d.values()) / W  # noqa: E731
    return recv(fwd), recv(bwd)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_comm_bytes_match_formula_and_do_not_grow_with_T(layout):
    W, B, H, K, V = 4, 2, 2, 8, 6
    L = 2 if layout == "zigzag" else 1
    state, decay = B * H * K * V * 4, B * H * 1 * 4
    for T_per_rank in (16, 64):
        fwd, bwd = _bytes_per_rank(W, layout, "allgather", T_per_rank)
        assert fwd == (W - 1) * L * (state + decay), (layout, T_per_rank, fwd)  # LASP-2: states + decays
        assert bwd == (W - 1) * L * (state + decay)  # the gradients and the decays again (nothing O(W) is kept)
        # ring (LASP-1): one state per rank edge of the chain (W-1 contiguous, 2W-2 zigzag)
        fwd, bwd = _bytes_per_rank(W, layout, "ring", T_per_rank)
        assert fwd == (W - 1) * L * state / W and bwd == fwd
        # All-Scan: contiguous the same chain; zigzag two half chains at once (the second also carries its decay
        # product, B·H·Kg) and a tree broadcast of the midpoint state to the other W-1 ranks
        fwd, bwd = _bytes_per_rank(W, layout, "allscan", T_per_rank)
        expect = (W - 1) * state if layout == "contiguous" else (W - 1) * (3 * state + decay)
        assert fwd == expect / W and bwd == expect / W


def test_chain_sends_counted():
    case = make_case(3, "key", False, dtype=torch.float32, V=8)
    reset_comm_stats()
    run_sp(case, SPContext(emulate=3, layout="contiguous"), "allscan", scan_blocks=4)
    run_sp(case, SPContext(emulate=3, layout="contiguous"), "ring")
    st = comm_stats()["by_tag_op"]
    assert st["allscan/send"]["calls"] == 2 * 4  # 2 rank edges x 4 blocks along V
    assert st["ring/send"]["calls"] == 2  # LASP-1: the whole state once per rank edge
    assert st["allscan:bwd/send"]["calls"] == 2 * 4 and st["ring:bwd/send"]["calls"] == 2


def test_user_errors_are_one_line():
    sp = SPContext(emulate=2, layout="zigzag")
    q = torch.randn(4, 8, 2, 4)
    with pytest.raises(ValueError, match="method"):
        sp_linear_attention(q, q, q, sp=sp, method="bogus")
    with pytest.raises(ValueError, match="initial_state"):
        sp_linear_attention(q, q, q, sp=sp, initial_state=torch.zeros(3, 2, 4, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        sp_linear_attention(q, q, q, sp=sp, cu_seqlens=torch.tensor([0, 16], dtype=torch.int32))
    with pytest.raises(ValueError, match="layout"):
        SPContext(emulate=2, layout="ring")
    with pytest.raises(ValueError, match="method must be one of"):
        SPContext(emulate=2, method="tree")
    with pytest.raises(ValueError, match="scan_blocks"):
        SPContext(emulate=2, scan_blocks=0)
    with pytest.raises(ValueError, match="divisible"):
        sp.shard(torch.randn(1, 6, 2))


def test_shard_gather_roundtrip_and_positions():
    for layout in LAYOUTS:
        sp = SPContext(emulate=3, layout=layout)
        x = torch.arange(2 * 12).reshape(2, 12).float()
        loc = sp.shard(x)
        assert loc.shape == (6, 4)
        assert torch.equal(sp.gather(loc), x)
        pos = sp.local_positions(4)
        assert torch.equal(loc[0::2].long(), pos)  # batch row 0 of every rank holds its global positions


def test_segment_plan_pieces_stay_in_one_document():
    W, T = 3, 36
    cu = torch.tensor([0, 5, 6, 17, 30, 36], dtype=torch.int32)  # starts inside segments and on edges (6, 30)
    doc_of = torch.bucketize(torch.arange(T), cu[1:].long(), right=True)
    for layout in LAYOUTS:
        sp = SPContext(emulate=W, layout=layout)
        plan = sp.segment_plan(T // W, cu)
        assert sp.segment_plan(T // W, cu) is plan  # built once per batch, reused by every layer
        pos = torch.cat([s * plan.Ts + torch.arange(plan.Ts) for r in range(W) for s in sp.rank_segments(r)])
        b = plan.local_cu
        assert b[0] == 0 and b[-1] == T and b == sorted(b)
        for s, e in zip(b, b[1:]):
            p = pos[s:e]
            assert len(set(doc_of[p].tolist())) == 1, (layout, s, e)   # one document per piece
            assert torch.equal(p, torch.arange(int(p[0]), int(p[0]) + e - s))  # contiguous globally
        # every held position where a document starts, or a segment begins, opens a piece
        starts = {i for i in range(T) if int(pos[i]) in cu.tolist() or i % plan.Ts == 0}
        assert starts == set(b[:-1])
