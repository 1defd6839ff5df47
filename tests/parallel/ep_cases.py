"""Expert parallelism cases shared by the emulated tests and the gloo workers (module level, so spawn imports them).

`run` evaluates the objective Σ y·probe (+ the balancing loss) of one MoE layer and returns the output and every
gradient; `hybrid` builds the MoE hybrid LM the model-level cases use. fp64, seeded, so every rank builds the same
full model and the same batch, and the single-device reference is computed on each rank.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from lsp.models import HybridConfig, HybridLM
from lsp.models.moe import MoE, expert_parameter_names, use_expert_parallel
from lsp.parallel import SPContext
from lsp.parallel.ep import EPContext

D = 16
MOE = dict(vocab_size=64, hidden_size=D, num_layers=2, num_heads=2, layer_pattern="LS", moe_experts=8,
           moe_top_k=2, moe_intermediate_size=12)
LM = dict(vocab_size=128, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, layer_pattern="LSL",
          linear_attn="gla", ce_chunk_size=40, moe_experts=8, moe_top_k=2, moe_intermediate_size=24,
          moe_shared_experts=1, moe_first_dense=1, moe_aux_loss_coef=0.05, moe_z_loss_coef=0.01,
          moe_router="sigmoid")


def make_moe(**kw) -> MoE:
    torch.manual_seed(0)
    moe = MoE(HybridConfig(**{**MOE, **kw})).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    moe.expert_bias.copy_(torch.randn(moe.cfg.moe_experts, dtype=torch.float64) * 0.2)
    return moe


def batch(rows: int, T: int = 5, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, T, D, generator=gen, dtype=torch.float64),
            torch.randn(rows, T, D, generator=gen, dtype=torch.float64))


def run(moe: MoE, x: torch.Tensor, probe: torch.Tensor):
    """(y, {param: grad}, x grad) of Σ y·probe + balancing loss. x, probe: [B, T, D]."""
    moe.zero_grad()
    xg = x.clone().requires_grad_()
    y, aux = moe(xg)
    ((y * probe).sum() + (aux if aux is not None else 0)).backward()
    return y.detach(), {n: p.grad.clone() for n, p in moe.named_parameters()}, xg.grad


def hybrid(**kw) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(HybridConfig(**{**LM, **kw})).double()


def lm_batch(B: int = 1, T: int = 64):
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, LM["vocab_size"], (B, T), generator=gen),
            torch.randint(0, LM["vocab_size"], (B, T), generator=gen))


def lm_loss_and_grads(model, ids, labels, sp=None):
    model.zero_grad()
    out = model(ids, labels=labels, sp=sp)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) if b.numel() else 0.0


# ---------------------------------------------------------------- gloo workers

def ep_module_and_model(rank: int, W: int) -> dict:
    """On W real ranks, EP over the world: (a) one MoE layer, each rank holding 2 rows of the batch (no SP: a
    rank's balancing loss is its own, so the coefficients are 0 here); (b) the MoE hybrid with sp = ep = W, aux and
    z losses on. Returns the worst relative error of each compared quantity."""
    errors = {}
    moe = make_moe(moe_shared_experts=1)
    x, probe = batch(2 * W)
    ref_y, ref_g, ref_gx = run(copy.deepcopy(moe), x, probe)
    ep = EPContext()
    use_expert_parallel(moe, ep)
    rows = slice(2 * rank, 2 * rank + 2)
    y, g, gx = run(moe, x[rows], probe[rows])
    errors["moe/y"], errors["moe/x_grad"] = max_err(y, ref_y[rows]), max_err(gx, ref_gx[rows])
    experts = ep.expert_range(moe.cfg.moe_experts)
    for n, grad in g.items():
        if n.startswith("experts."):   # this rank's experts: every rank's tokens reached them
            errors[f"moe/{n}"] = max_err(grad, ref_g[n][experts.start:experts.stop])
        else:                          # replicated: each rank holds its rows' share
            dist.all_reduce(grad)
            errors[f"moe/{n}"] = max_err(grad, ref_g[n])
    model = hybrid()
    ids, labels = lm_batch()
    ref_loss, ref_grads = lm_loss_and_grads(copy.deepcopy(model), ids, labels)
    sp = SPContext()
    use_expert_parallel(model, EPContext())
    loss, grads = lm_loss_and_grads(model, sp.shard(ids, 1), sp.shard(labels, 1), sp=sp)
    errors["lm/loss"] = max_err(loss, ref_loss)
    expert_names = set(expert_parameter_names(model))
    for n, grad in grads.items():
        if n in expert_names:
            errors[f"lm/{n}"] = max_err(grad, ref_grads[n][experts.start:experts.stop])
        else:
            dist.all_reduce(grad)
            errors[f"lm/{n}"] = max_err(grad, ref_grads[n])
    return errors
