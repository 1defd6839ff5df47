"""Shared cases for the sequence-parallel DPLR tests: inputs, the naive single-device reference, the SP run, and the
function real gloo ranks run (module level so `spawn` can import it)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lsp.ops import dplr_delta_rule
from lsp.parallel import DELTA_METHODS, SPContext, sp_dplr_delta_rule

from .cases import make_case, max_rel_err

NAMES = ("q", "k", "v", "a", "b", "g", "h0")


def make_dplr_case(W, varlen, dtype=torch.float64, seed=0, T_per_rank=32, H=2, K=8, V=6):
    """make_case's q, k, v, per-key g <= 0, h0, cu, loss weights, with RWKV-7's a = -κ̂ and b = κ̂ ⊙ α, α in (0, 1)."""
    c = make_case(W, "key", varlen, dtype=dtype, seed=seed, T_per_rank=T_per_rank, H=H, K=K, V=V)
    gen = torch.Generator().manual_seed(seed + 200)
    kappa = F.normalize(torch.randn(c["q"].shape, generator=gen, dtype=torch.float64), dim=-1)
    alpha = torch.rand(c["q"].shape, generator=gen, dtype=torch.float64)
    c["a"], c["b"] = (-kappa).to(dtype), (kappa * alpha).to(dtype)
    return c


def _leaves(c):
    return {n: c[n].clone().requires_grad_() for n in NAMES}


def dplr_reference(c):
    """Outputs and gradients of the step-by-step recurrence on the full sequence (loss = Σ o·wo + Σ final·wf)."""
    x = _leaves(c)
    o, f = dplr_delta_rule(*(x[n] for n in NAMES[:-1]), initial_state=x["h0"], output_final_state=True,
                           cu_seqlens=c["cu"], backend="naive")
    ((o * c["wo"]).sum() + (f * c["wf"]).sum()).backward()
    return {"o": o.detach(), "final": f.detach(), **{n: t.grad for n, t in x.items()}}


def run_sp_dplr(c, sp: SPContext, method: str, scan_blocks: int = 3, backend: str = "auto"):
    """The same loss through sp_dplr_delta_rule; each rank's loss is its share, so Σ over ranks = the loss.
    Returns the gathered output, the final state (rank 0's copy) and the full gradients (summed over ranks)."""
    x = _leaves(c)
    loc = [sp.shard(x[n]) for n in NAMES[:-1]]
    o, f = sp_dplr_delta_rule(*loc, sp=sp, method=method, initial_state=x["h0"], output_final_state=True,
                              cu_seqlens=c["cu"], scan_blocks=scan_blocks, backend=backend)
    fr = f.reshape(sp.rows, *c["wf"].shape)
    ((o * sp.shard(c["wo"])).sum() + (fr * c["wf"]).sum() / sp.world_size).backward()
    # a rank holding no sequence start never touches h0: its share of that gradient is zero
    grads = {n: torch.zeros_like(t) if t.grad is None else t.grad for n, t in x.items()}
    if not sp.emulated:
        for t in grads.values():
            dist.all_reduce(t)
    return {"o": sp.gather(o.detach()), "final": fr[0].detach(), **grads}


def gloo_dplr(rank, world_size, cases=(("contiguous", False), ("contiguous", True), ("zigzag", False),
                                        ("zigzag", True))):
    """On real ranks: every method's worst error against the naive reference, per (layout, packed) case."""
    errors = {}
    for layout, varlen in cases:
        case = make_dplr_case(world_size, varlen)
        ref = dplr_reference(case)
        for method in DELTA_METHODS:
            errors[(layout, varlen, method)] = max(
                max_rel_err(run_sp_dplr(case, SPContext(layout=layout), method), ref).values())
    return errors
