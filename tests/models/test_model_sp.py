"""HybridLM under sequence parallelism equals sp=None: loss, logits and every parameter gradient.

Emulated ranks (one process, ranks folded into the batch) for W = 2, 4, both layouts and every linear SP method;
then 2 real gloo processes, where the SUM over ranks of the parameter gradients must equal the sp=None gradients.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lsp.parallel as parallel
from lsp.models import HybridConfig, HybridLM

if not hasattr(parallel, "sp_linear_attention") or not hasattr(parallel, "sp_softmax_attention"):
    pytest.skip("lsp.parallel has no sp_linear_attention / sp_softmax_attention yet", allow_module_level=True)
from lsp.parallel import SPContext  # noqa: E402

CFG = dict(vocab_size=128, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, layer_pattern="LSL",
           linear_attn="gla", ce_chunk_size=40)


def make_batch(B, T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG["vocab_size"], (B, T), generator=gen)
    labels = torch.randint(0, CFG["vocab_size"], (B, T), generator=gen)
    labels[:, ::7] = -100
    return ids, labels


def loss_and_grads(model, ids, labels, **kw):
    model.zero_grad()
    out = model(ids, labels=labels, **kw)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(loss, grads, ref_loss, ref_grads, tol=1e-10):
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-8, atol=tol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("method", ["allgather", "allscan", "ring"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("W", [2, 4])
def test_emulated_sp_equals_single_device(W, layout, method):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**CFG, sp_method=method)).double()
    ids, labels = make_batch(2, 64)
    ref = loss_and_grads(model, ids, labels)
    sp = SPContext(emulate=W, layout=layout)
    got = loss_and_grads(model, sp.shard(ids, 1), sp.shard(labels, 1), sp=sp)
    assert_same(*got, *ref)


@pytest.mark.parametrize("kind", ["linear", "lightning", "simple_gla"])
def test_emulated_sp_other_linear_variants(kind):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**{**CFG, "linear_attn": kind})).double()
    ids, labels = make_batch(2, 64)
    ref = loss_and_grads(model, ids, labels)
    sp = SPContext(emulate=2, layout="zigzag")
    assert_same(*loss_and_grads(model, sp.shard(ids, 1), sp.shard(labels, 1), sp=sp), *ref)


def test_emulated_sp_packed_documents_and_logits():
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**CFG)).double()
    ids, labels = make_batch(1, 64)
    cu = torch.tensor([0, 13, 40, 64], dtype=torch.int32)  # boundaries inside rank segments
    ref = loss_and_grads(model, ids, labels, cu_seqlens=cu)
    sp = SPContext(emulate=2, layout="zigzag")
    assert_same(*loss_and_grads(model, sp.shard(ids, 1), sp.shard(labels, 1), sp=sp, cu_seqlens=cu), *ref)
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

def _gloo_worker(rank, world, init_file, out_dir, ids, labels, cu):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for method in ("allgather", "allscan", "ring"):
            torch.manual_seed(0)
            model = HybridLM(HybridConfig(**CFG, sp_method=method)).double()
            sp = SPContext(layout="zigzag")
            results[method] = loss_and_grads(model, sp.shard(ids, 1), sp.shard(labels, 1), sp=sp, cu_seqlens=cu)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gloo_two_ranks_sum_of_grads_equals_single_device(tmp_path):
    world = 2
    ids, labels = make_batch(1, 64)
    cu = torch.tensor([0, 29, 64], dtype=torch.int32)
    mp.spawn(_gloo_worker, args=(world, str(tmp_path / "init"), str(tmp_path), ids, labels, cu), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**CFG)).double()
    ref_loss, ref_grads = loss_and_grads(model, ids, labels, cu_seqlens=cu)
    for method in ("allgather", "allscan", "ring"):
        per_rank = [r[method] for r in ranks]
        summed = {n: sum(r[1][n] for r in per_rank) for n in ref_grads}
        for loss, _ in per_rank:  # the same global-mean loss on every rank
            torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
        assert_same(per_rank[0][0], summed, ref_loss, ref_grads)
        # negative control: one rank's gradient alone is not the full gradient
        assert not torch.allclose(per_rank[0][1]["embed.weight"], ref_grads["embed.weight"])
