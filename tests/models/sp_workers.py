"""Shared cases of the model SP tests and the function each real gloo rank runs (importable by spawned ranks)."""
import torch

from lsp.models import HybridConfig, HybridLM
from lsp.parallel import SPContext

CFG = dict(vocab_size=128, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, layer_pattern="LSL",
           linear_attn="gla", ce_chunk_size=40)
GLOO_CU = torch.tensor([0, 29, 64], dtype=torch.int32)


def make_batch(B, T, seed=0):
    # ids, labels: [B, T] long; every 7th label ignored
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


def hybrid_lm_grads(rank, world_size, overrides=None):
    """Loss and this rank's parameter gradients for every linear SP method (zigzag, packed documents), of the CFG
    model with `overrides` (HybridConfig fields)."""
    ids, labels = make_batch(1, 64)
    results = {}
    for method in ("allgather", "allscan", "ring"):
        torch.manual_seed(0)
        model = HybridLM(HybridConfig(**{**CFG, **(overrides or {})})).double()
        sp = SPContext(layout="zigzag", method=method)
        results[method] = loss_and_grads(model, sp.shard(ids, 1), sp.shard(labels, 1), sp=sp, cu_seqlens=GLOO_CU)
    return results


def fsdp2_bf16_loss(rank, world_size, overrides):
    """Loss of the CFG model with `overrides` wrapped as lsp's FSDP engine wraps it (fully_shard per block and on the
    root, bf16 param dtype: FSDP2 casts every block's forward inputs, rebuilding the containers it walks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**{**CFG, **overrides}))
    mesh = init_device_mesh("cpu", (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    ids, labels = make_batch(2, 64)
    loss = model(ids, labels=labels).loss
    loss.backward()
    return loss.item()
