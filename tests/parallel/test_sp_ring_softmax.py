"""Ring attention for softmax layers (softmax_method="ring"): equal to single-device softmax attention in fp64
(emulated W = 1..4 and real gloo ranks W = 2, 4), packed documents and GQA; what backward keeps does not grow with
W at fixed T/W; the bytes sent are the formula's; the next block's transfer is launched before this block's
attention; the config key selects it."""
import itertools

import pytest
import torch

import lsp.parallel.ring_softmax as ring_mod
from lsp.names import SOFTMAX_SP_METHODS
from lsp.ops.softmax import merge_blocks
from lsp.parallel import LAYOUTS, SPContext, comm_stats, reset_comm_stats, softmax_methods, sp_softmax_attention, spawn

from .cases import make_softmax_case, max_rel_err, run_sp_softmax, softmax_reference
from .test_sp_softmax import _saved_storages, explicit, packed_case

# fp64 throughout: a correct ring differs from the single-device result only by the order of the log-sum-exp
# merges, ~1e-15 relative; 1e-10 leaves room for that and catches any dropped or doubled key (>= 1e-3 below).
TOL = 1e-10


def ring(W, layout="zigzag"):
    return SPContext(emulate=W, layout=layout, softmax_method="ring")


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_ring_matches_single_device(W):
    """Unpacked B = 2 and packed documents, causal and not, both layouts, GQA 4:2: outputs and q, k, v grads."""
    for varlen, causal, layout in itertools.product((False, True), (True, False), LAYOUTS):
        case = make_softmax_case(W, varlen)
        err = max_rel_err(run_sp_softmax(case, ring(W, layout), causal), softmax_reference(case, causal))
        assert max(err.values()) < TOL, (varlen, causal, layout, err)


@pytest.mark.parametrize("W", [2, 3, 4])
def test_ring_packed_documents_match_explicit_reference(W):
    """Documents crossing rank and zigzag segment edges, a run of equal-length documents (batched diagonal
    blocks), GQA 4:2 and 4:1, against the explicit masked softmax(QKᵀ)V in fp64."""
    for layout, causal, Hkv in itertools.product(LAYOUTS, (True, False), (2, 1)):
        case = packed_case(W, Hkv=Hkv)
        err = max_rel_err(run_sp_softmax(case, ring(W, layout), causal), explicit(case, causal))
        assert max(err.values()) < TOL, (layout, causal, Hkv, err)


def test_negative_control_merge_without_rescale_fails(monkeypatch):
    """Adding the blocks' outputs without the log-sum-exp weights must break the same assertion."""
    def unweighted(o, lse, o_b, lse_b):
        _, merged = merge_blocks(o, lse, o_b, lse_b)
        return o + o_b, merged
    monkeypatch.setattr(ring_mod, "merge_blocks", unweighted)
    case = make_softmax_case(3, False)
    err = max_rel_err(run_sp_softmax(case, ring(3)), softmax_reference(case))
    assert err["o"] > 1e-3, err


def test_negative_control_key_from_previous_document_fails(monkeypatch):
    """Every piece's visible range reaching one token into the previous document must break the assertion."""
    real = ring_mod.query_pieces
    monkeypatch.setattr(ring_mod, "query_pieces",
                        lambda *a: ((s, x, y, max(d - 1, 0), e) for s, x, y, d, e in real(*a)))
    case = packed_case(3)
    err = max_rel_err(run_sp_softmax(case, ring(3)), explicit(case))
    assert err["o"] > 1e-3 and err["k"] > 1e-3, err


def _kept_per_rank(sp, T_local=64, H=4, Hkv=2, D=8):
    # bytes saved for backward per rank beyond the inputs (emulation folds its W ranks into the batch: / W)
    case = make_softmax_case(sp.world_size, False, T_per_rank=T_local, H=H, Hkv=Hkv, D=D)
    q, k, v = (sp.shard(case[n]).requires_grad_() for n in ("q", "k", "v"))
    o, saved, _ = _saved_storages(lambda: sp_softmax_attention(q, k, v, sp=sp), (q, k, v))
    o.sum().backward()
    return saved / sp.rows


def own_kept(B=2, T_local=64, H=4, D=8, item=8):
    """What ring attention keeps per rank: its output and log-sum-exp (fp64, B = 2, 4 query heads of 8)."""
    return item * B * T_local * (H * D + H)


def test_ring_keeps_nothing_that_grows_with_w():
    """At fixed T/W = 64 tokens, W = 1, 2, 4, 8 emulated: ring keeps per rank exactly its output and log-sum-exp,
    whatever W (real ranks, with LASP-2H as the control that grows: test_gloo_ring)."""
    assert [_kept_per_rank(ring(W)) for W in (1, 2, 4, 8)] == [own_kept()] * 4


def ring_bytes(W, B, T_local, Hkv, D, item):
    """Per rank and call: forward (W-1) shifts of K|V; backward (W-1) of K|V and W of the fp32+ dK|dV."""
    kv = 2 * B * T_local * Hkv * D * item
    return {"softmax_ring/ring_shift": (W - 1) * kv, "softmax_ring:bwd/ring_shift": (W - 1) * kv,
            "softmax_ring:dkv:bwd/ring_shift": W * kv * max(item, 4) // item}


def test_ring_bytes_match_formula():
    W, B, T_local, Hkv, D = 4, 2, 16, 2, 8
    reset_comm_stats()
    run_sp_softmax(make_softmax_case(W, False, dtype=torch.float32), ring(W))
    stats = comm_stats()
    got = {k: s["bytes_recv"] // W for k, s in stats["by_tag_op"].items()}
    assert got == ring_bytes(W, B, T_local, Hkv, D, 4)
    assert all(s["bytes_sent"] == s["bytes_recv"] for s in stats["ranks"].values())


def test_next_transfer_is_launched_before_this_blocks_attention(monkeypatch):
    """Forward: at every step but the last, the shift of the K|V block is started before its first block
    attention runs (so the transfer overlaps it); no shift after the last step."""
    events = []
    real_fwd = ring_mod.flash_block_forward
    monkeypatch.setattr(ring_mod, "flash_block_forward", lambda *a: events.append("attn") or real_fwd(*a))
    sp = ring(3)
    real_shift = sp.comm.ring_shift
    sp.comm.ring_shift = lambda x, tag: events.append("shift") or real_shift(x, tag)
    case = make_softmax_case(3, False)
    with torch.no_grad():
        sp_softmax_attention(*(sp.shard(case[n]) for n in ("q", "k", "v")), sp=sp)
    steps = "".join("s" if e == "shift" else "a" for e in events).split("s")
    assert events[0] == "shift" and events.count("shift") == 2 and all(steps[1:]), events


def test_config_selects_ring_and_unknown_names_raise():
    assert softmax_methods() == SOFTMAX_SP_METHODS
    with pytest.raises(ValueError, match="softmax_method must be one of"):
        SPContext(emulate=2, softmax_method="rign")
    q = torch.randn(2, 4, 2, 8)
    with pytest.raises(ValueError, match="method must be one of"):
        sp_softmax_attention(q, q, q, sp=SPContext(emulate=2), method="bogus")
    from lsp.run_config import ConfigError, load_config

    with pytest.raises(ConfigError, match="parallel.softmax_method"):
        load_config(None, ["parallel.softmax_method=rign"])


def test_hybrid_model_runs_its_softmax_layers_on_the_ring():
    """HybridLM under SP with softmax_method="ring" gives the single-device logits and gradients (fp64)."""
    from lsp.models import HybridConfig, HybridLM

    torch.manual_seed(0)
    cfg = HybridConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       layer_pattern="LS", linear_attn="gla")
    model = HybridLM(cfg).double()
    ids = torch.randint(0, 32, (1, 32))
    ref_loss = model(ids, labels=ids).loss
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sp = ring(2)
    loss = model(sp.shard(ids), labels=sp.shard(ids), sp=sp).loss
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    worst = max(((p.grad - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-30)).item()
                for n, p in model.named_parameters())
    assert worst < TOL


def gloo_ring(rank, world_size):
    """Real ranks: unpacked and packed cases, both layouts, ring method: worst error; the ring's bytes; the bytes
    saved for backward by ring and by LASP-2H at T/W = 64."""
    errors = {}
    for layout, varlen in itertools.product(LAYOUTS, (False, True)):
        sp = SPContext(layout=layout, softmax_method="ring")
        case = packed_case(world_size, Hkv=1) if varlen else make_softmax_case(world_size, False)
        ref = explicit(case) if varlen else softmax_reference(case)
        errors[(layout, varlen)] = max(max_rel_err(run_sp_softmax(case, sp), ref).values())
    reset_comm_stats()
    run_sp_softmax(make_softmax_case(world_size, False, dtype=torch.float32), SPContext(softmax_method="ring"))
    stats = comm_stats()["by_tag_op"]
    sent_recv = {k: (s["bytes_sent"], s["bytes_recv"]) for k, s in stats.items() if k.startswith("softmax")}
    kept = {m: _kept_per_rank(SPContext(softmax_method=m)) for m in SOFTMAX_SP_METHODS}
    return errors, sent_recv, kept


@pytest.mark.parametrize("W", [2, pytest.param(4, marks=pytest.mark.slow)])   # W = 4: ~40 s on 2 busy cores
def test_gloo_ring(W):
    """Exact on real ranks; bytes as the formula; what backward keeps: ring its own output and log-sum-exp only,
    LASP-2H (control) also the gathered K|V of all W·64 tokens (fp64, B = 2, 2 kv heads of 8)."""
    expected = ring_bytes(W, 2, 16, 2, 8, 4)
    for errors, sent_recv, kept in spawn(gloo_ring, W, timeout_s=180):
        assert all(e < TOL for e in errors.values()), errors
        assert sent_recv == {k: (b, b) for k, b in expected.items()}
        assert kept == {"ring": own_kept(), "allgather": own_kept() + 8 * 2 * 2 * W * 64 * 2 * 8}
