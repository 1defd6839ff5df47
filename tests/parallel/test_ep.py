"""Expert parallelism equals the single-device MoE (fp64): outputs and every gradient (router, experts, shared
experts, the input), emulated W = 2, 4 and over gloo W = 2, 4, with and without SP, with negative controls.

Tolerance: fp64 round-off. EP computes the same per-token products; only the order of the sums over a token's k
experts and over a weight's tokens can change, so relative errors are ~1e-15; 1e-10 leaves room and would still
catch any token sent to the wrong expert or weight (errors O(1)).
"""
import pytest
import torch

from lsp.models.moe import use_expert_parallel
from lsp.parallel import SPContext, comm_stats, reset_comm_stats, spawn
from lsp.parallel import ep as ep_module
from lsp.parallel.ep import EPContext

from . import ep_cases
from .ep_cases import batch, hybrid, lm_batch, lm_loss_and_grads, make_moe, max_err, run

TOL = 1e-10


def assert_same(got, ref):
    (y, g, gx), (ry, rg, rgx) = got, ref
    assert max_err(y, ry) < TOL and max_err(gx, rgx) < TOL
    bad = {n: max_err(g[n], rg[n]) for n in rg if not max_err(g[n], rg[n]) < TOL}
    assert not bad, bad


CASES = [dict(), dict(moe_router="sigmoid", moe_shared_experts=1, moe_top_k=3),
         dict(moe_aux_loss_coef=0.1, moe_z_loss_coef=0.01, moe_top_k=1)]


@pytest.mark.parametrize("kw", CASES, ids=["softmax", "sigmoid-shared-top3", "aux-z-top1"])
@pytest.mark.parametrize("W", [2, 4])
def test_emulated_ep_equals_single_device(W, kw):
    moe = make_moe(**kw)
    x, probe = batch(2 * W)
    ref = run(moe, x, probe)
    moe.ep = EPContext(emulate=W)
    assert_same(run(moe, x, probe), ref)


def test_emulated_ep_with_capacity_equals_per_rank_dispatch():
    # capacity is per dispatch group (the tokens of one rank), so the reference runs each rank's rows alone
    W = 4
    moe = make_moe(moe_capacity_factor=0.75)
    x, probe = batch(2 * W)
    refs = [run(moe, x[2 * r:2 * r + 2], probe[2 * r:2 * r + 2]) for r in range(W)]
    dropped = 0
    for r in range(W):
        run(moe, x[2 * r:2 * r + 2], probe[2 * r:2 * r + 2])
        dropped += moe.stats["dropped"]
    ry, rgx = torch.cat([r[0] for r in refs]), torch.cat([r[2] for r in refs])
    rg = {n: sum(r[1][n] for r in refs) for n in refs[0][1]}
    moe.ep = EPContext(emulate=W)
    assert_same(run(moe, x, probe), (ry, rg, rgx))
    assert moe.stats["dropped"] == dropped > 0


def test_negative_control_rows_not_regrouped_by_expert(monkeypatch):
    # arrived rows are in (source, expert) order; running them as if expert-major must be caught
    moe = make_moe()
    x, probe = batch(4)
    ry, _, _ = run(moe, x, probe)
    moe.ep = EPContext(emulate=2)
    monkeypatch.setattr(ep_module, "_expert_major", lambda blocks: torch.arange(int(blocks.sum())))
    y, _, _ = run(moe, x, probe)
    assert max_err(y, ry) > 1e-3


def test_emulated_ep_dispatch_bytes():
    # forward: each rank sends the rows routed to the other rank's experts (D fp64 values each), and gets them back
    W, moe = 2, make_moe()
    x, probe = batch(2 * W)
    moe.ep = EPContext(emulate=W)
    reset_comm_stats()
    with torch.no_grad():
        moe(x)
    experts = moe.stats["load"]   # all tokens' picks; rank r's rows are the r-th half of the batch
    logits = x.reshape(-1, 16) @ moe.router.weight.t()
    picks = (torch.softmax(logits, -1) + moe.expert_bias).topk(2, -1).indices.reshape(W, -1)
    leaving = sum(int((picks[r] // 4 != r).sum()) for r in range(W))
    assert experts.sum() == picks.numel()
    stats = comm_stats()["by_tag_op"]
    assert stats["ep_dispatch/all_to_all"]["bytes_sent"] == leaving * 16 * 8
    assert stats["ep_combine/all_to_all"]["bytes_sent"] == leaving * 16 * 8


@pytest.mark.parametrize("W,checkpointing", [(2, False), (4, False), (2, True)])
def test_emulated_sp_and_ep_hybrid_equals_single_device(W, checkpointing):
    # SP and EP on the same (virtual) ranks: the EP group dispatches the tokens of all SP shards; with activation
    # checkpointing the recompute dispatches again, and the load is still counted once
    model = hybrid(activation_checkpointing=checkpointing)
    ids, labels = lm_batch()
    ref_loss, ref_grads = lm_loss_and_grads(model, ids, labels)
    ref_load = model.layers[1].mlp.load.clone()
    model.layers[1].mlp.load.zero_()
    sp = SPContext(emulate=W)
    use_expert_parallel(model, EPContext(emulate=W))
    loss, grads = lm_loss_and_grads(model, sp.shard(ids, 1), sp.shard(labels, 1), sp=sp)
    assert max_err(loss, ref_loss) < TOL
    bad = {n: max_err(grads[n], g) for n, g in ref_grads.items() if not max_err(grads[n], g) < TOL}
    assert not bad, bad
    assert ref_grads["layers.1.mlp.router.weight"].abs().max() > 0
    assert torch.equal(model.layers[1].mlp.load, ref_load) and ref_load.sum() == 64 * 2


@pytest.mark.parametrize("W", [2, pytest.param(4, marks=pytest.mark.slow)])   # W=2: 9 s on 2 shared cores
def test_gloo_ep_equals_single_device(W):
    for errors in spawn(ep_cases.ep_module_and_model, W, timeout_s=240):
        bad = {k: e for k, e in errors.items() if not e < TOL}
        assert not bad, bad
        assert {"moe/experts.gate", "moe/router.weight", "lm/loss", "lm/layers.2.mlp.experts.down"} <= set(errors)
