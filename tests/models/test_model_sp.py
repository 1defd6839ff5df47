"""HybridLM under sequence parallelism equals sp=None: loss, logits and every parameter gradient.

Emulated ranks (one process, ranks folded into the batch) for W = 2, 4, both layouts and every linear SP method;
then 2 real gloo processes, where the SUM over ranks of the parameter gradients must equal the sp=None gradients.
"""
import pytest
import torch

from lsp.models import HybridConfig, HybridLM
from lsp.parallel import SPContext, spawn

from . import sp_workers
from .sp_workers import CFG, loss_and_grads, make_batch


def assert_same(loss, grads, ref_loss, ref_grads, tol=1e-10):
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-8, atol=tol, msg=lambda m: f"{n}: {m}")


def check_emulated(W, layout, B=2, cu_seqlens=None, method="allgather", **overrides):
    """sp=None vs SPContext(emulate=W, layout, method): same loss and parameter gradients (fp64). Returns model, sp."""
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**{**CFG, **overrides})).double()
    ids, labels = make_batch(B, 64)
    ref = loss_and_grads(model, ids, labels, cu_seqlens=cu_seqlens)
    sp = SPContext(emulate=W, layout=layout, method=method)
    assert_same(*loss_and_grads(model, sp.shard(ids, 1), sp.shard(labels, 1), sp=sp, cu_seqlens=cu_seqlens), *ref)
    return model, sp, ids


@pytest.mark.parametrize("method", ["allgather", "allscan", "ring"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("W", [2, 4])
def test_emulated_sp_equals_single_device(W, layout, method):
    check_emulated(W, layout, method=method)


@pytest.mark.parametrize("kind", ["linear", "lightning", "simple_gla"])
def test_emulated_sp_other_linear_variants(kind):
    check_emulated(2, "zigzag", linear_attn=kind)


def test_emulated_sp_with_activation_checkpointing():
    check_emulated(4, "zigzag", activation_checkpointing=True)


def test_emulated_sp_packed_documents_and_logits():
    cu = torch.tensor([0, 13, 40, 64], dtype=torch.int32)  # boundaries inside rank segments
    model, sp, ids = check_emulated(2, "zigzag", B=1, cu_seqlens=cu)
    with torch.no_grad():
        full = model(ids, cu_seqlens=cu).logits
        local = model(sp.shard(ids, 1), sp=sp, cu_seqlens=cu).logits
    torch.testing.assert_close(sp.gather(local, 1), full)


def test_negative_control_local_positions_break_equivalence(monkeypatch):
    # a model that used local (per-shard) RoPE positions instead of global ones must be caught by these tests
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**CFG)).double()
    ids, labels = make_batch(2, 64)
    ref_loss, _ = loss_and_grads(model, ids, labels)
    sp = SPContext(emulate=2, layout="zigzag")
    monkeypatch.setattr(sp, "local_positions", lambda T, device=None: torch.arange(T).expand(2, T))
    loss, _ = loss_and_grads(model, sp.shard(ids, 1), sp.shard(labels, 1), sp=sp)
    assert (loss - ref_loss).abs() > 1e-6


# ---------------------------------------------------------------- real processes (gloo)

def test_gloo_two_ranks_sum_of_grads_equals_single_device():
    check_gloo()


def check_gloo(**overrides):
    """2 gloo ranks, every linear SP method, zigzag, packed documents: each rank's loss is the sp=None loss and the
    sum of the ranks' parameter gradients is its gradients (CFG with `overrides`)."""
    world = 2
    ranks = spawn(sp_workers.hybrid_lm_grads, world, overrides, timeout_s=240)
    ids, labels = make_batch(1, 64)
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**{**CFG, **overrides})).double()
    ref_loss, ref_grads = loss_and_grads(model, ids, labels, cu_seqlens=sp_workers.GLOO_CU)
    for method in ("allgather", "allscan", "ring"):
        per_rank = [r[method] for r in ranks]
        for loss, _ in per_rank:  # the same global-mean loss on every rank
            torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
        summed = {n: sum(r[1][n] for r in per_rank) for n in ref_grads}
        assert_same(per_rank[0][0], summed, ref_loss, ref_grads)
        # negative control: one rank's gradient alone is not the full gradient
        assert not torch.allclose(per_rank[0][1]["embed.weight"], ref_grads["embed.weight"])


def test_unsharded_input_is_rejected():
    model = HybridLM(HybridConfig(**CFG))
    ids, labels = make_batch(1, 64)
    with pytest.raises(ValueError, match="input_ids batch"):
        model(ids, labels=labels, sp=SPContext(emulate=2))
