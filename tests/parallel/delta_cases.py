"""Shared cases for the sequence-parallel delta-rule tests: inputs, the single-device reference, the SP run, and
the functions real gloo ranks run (module level so `spawn` can import them)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lsp.ops import delta_rule
from lsp.ops.delta import short_conv
from lsp.parallel import DELTA_METHODS, SPContext, comm_stats, reset_comm_stats, sp_delta_rule, sp_short_conv

from .cases import doc_bounds, make_case, max_rel_err

NAMES = ("q", "k", "v", "beta", "g", "h0")


def make_delta_case(W, gated, varlen, dtype=torch.float64, seed=0, T_per_rank=32, H=2, K=8, V=6, per_key=False,
                    groups=1):
    """make_case's q, v, h0, cu, loss weights, with unit-norm keys, beta in (0, 2) and g <= 0 (or None): one gate
    per head, or per key channel with `per_key` (KDA). With `groups` G, q and k keep H heads and v, beta, g, h0 and
    the loss weights get HV = G·H (grouped value heads)."""
    form = ("key" if per_key else "scalar") if gated else "none"
    c = make_case(W, form, varlen, dtype=dtype, seed=seed, T_per_rank=T_per_rank, H=H * groups, K=K, V=V)
    c["q"], c["k"] = c["q"][:, :, ::groups].contiguous(), c["k"][:, :, ::groups].contiguous()
    gen = torch.Generator().manual_seed(seed + 100)
    c["k"] = F.normalize(c["k"].double(), dim=-1).to(dtype)
    c["beta"] = 2 * torch.sigmoid(torch.randn(c["v"].shape[:3], generator=gen, dtype=torch.float64)).to(dtype)
    return c


def _leaves(c):
    return {n: c[n].clone().requires_grad_() for n in NAMES if c[n] is not None}


def delta_reference(c, backend="auto"):
    """Outputs and gradients of the single-device op on the full sequence (loss = Σ o·wo + Σ final·wf); backend
    "naive" is the step-by-step recurrence."""
    x = _leaves(c)
    o, f = delta_rule(x["q"], x["k"], x["v"], x["beta"], x.get("g"), initial_state=x["h0"], output_final_state=True,
                      cu_seqlens=c["cu"], backend=backend)
    ((o * c["wo"]).sum() + (f * c["wf"]).sum()).backward()
    return {"o": o.detach(), "final": f.detach(), **{n: t.grad for n, t in x.items()}}


def run_sp_delta(c, sp: SPContext, method: str, scan_blocks: int = 3, frozen=(), autocast=False, backend="auto"):
    """The same loss through sp_delta_rule; each rank's loss is its share, so Σ over ranks = the loss.

    `frozen` names inputs that do not require grad on this rank; `autocast` runs the forward under a bf16 autocast
    (backward outside it, as PyTorch recommends). Returns the gathered output, the final state
    (rank 0's copy) and the full gradients of the other inputs (summed over ranks).
    """
    x = _leaves(c)
    for n in frozen:
        x[n].requires_grad_(False)
    W = sp.world_size
    loc = {n: sp.shard(x[n]) for n in ("q", "k", "v", "beta", "g") if n in x}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        o, f = sp_delta_rule(loc["q"], loc["k"], loc["v"], loc["beta"], loc.get("g"), sp=sp, method=method,
                             initial_state=x["h0"], output_final_state=True, cu_seqlens=c["cu"],
                             scan_blocks=scan_blocks, backend=backend)
    fr = f.reshape(sp.rows, *c["wf"].shape)
    loss = (o * sp.shard(c["wo"])).sum() + (fr * c["wf"]).sum() / W
    loss.backward()
    grads = {n: (t.grad if t.grad is not None else torch.zeros_like(t)) for n, t in x.items() if n not in frozen}
    if not sp.emulated:
        for t in grads.values():
            dist.all_reduce(t)
    return {"o": sp.gather(o.detach()), "final": fr[0].detach(), **grads}


def gloo_delta(rank, world_size):
    """On real ranks: every method x layout x (gated, packed) case's worst error, a KDA case's (a gate per key,
    grouped value heads, packed; against the naive recurrence), the conv halo's, the allgather byte counts, and
    `gloo_frozen`'s errors."""
    errors = {}
    for layout in ("contiguous", "zigzag"):
        for gated, varlen in ((False, False), (True, True), (True, False)):
            case = make_delta_case(world_size, gated, varlen)
            ref = delta_reference(case)
            for method in DELTA_METHODS:
                errors[(layout, gated, varlen, method)] = max(
                    max_rel_err(run_sp_delta(case, SPContext(layout=layout), method), ref).values())
    kda = make_delta_case(world_size, True, True, per_key=True, groups=2)   # a gate per key, HV = 2·H, packed
    kda_ref = delta_reference(kda, backend="naive")
    for layout in ("contiguous", "zigzag"):
        for method in DELTA_METHODS:
            errors[("kda", layout, method)] = max(
                max_rel_err(run_sp_delta(kda, SPContext(layout=layout), method), kda_ref).values())
    for layout in ("contiguous", "zigzag"):
        c = conv_case(world_size, True)
        err = max_rel_err(run_sp_conv(c, SPContext(layout=layout)), conv_reference(c))
        errors[("conv", layout)] = max(err.values())
    reset_comm_stats()
    run_sp_delta(make_delta_case(world_size, True, False, dtype=torch.float32), SPContext(layout="contiguous"),
                 "allgather")
    stats = comm_stats()["by_tag_op"]
    return {"errors": errors, "recv": stats["delta_allgather/all_gather"]["bytes_recv"],
            "recv_bwd": stats["delta_allgather:bwd/all_gather"]["bytes_recv"], "frozen": gloo_frozen(rank, world_size)}


def gloo_frozen(rank, world_size):
    """Only rank 0's inputs require grad; the other ranks must still join every backward collective, and rank 0's
    gradients (of the tokens it holds: the others' shares are frozen) equal the reference's. Returns the errors."""
    case = make_delta_case(world_size, True, True)
    ref = delta_reference(case)
    sp = SPContext(layout="zigzag")
    x = {n: case[n].clone().requires_grad_(rank == 0) for n in NAMES if case[n] is not None}
    o, f = sp_delta_rule(*(sp.shard(x[n]) for n in ("q", "k", "v", "beta", "g")), sp=sp, initial_state=x["h0"],
                         output_final_state=True, cu_seqlens=case["cu"])
    ((o * sp.shard(case["wo"])).sum() + (f * case["wf"]).sum() / world_size).backward()
    if rank != 0:
        return {}
    return max_rel_err({n: sp.shard(x[n].grad) for n in ("q", "k", "v", "beta", "g")},
                       {n: sp.shard(ref[n]) for n in ("q", "k", "v", "beta", "g")})


def gloo_frozen_without_token(rank, world_size):
    """Negative control: without the participation token the frozen ranks cannot run the backward at all (and
    rank 0 then loses its peers inside the backward collective). Returns each rank's error message."""
    import lsp.parallel.delta as delta_mod

    delta_mod.join_token = lambda: torch.empty(0)
    try:
        gloo_frozen(rank, world_size)
    except RuntimeError as err:
        return str(err).splitlines()[0]
    return "no error"


def conv_case(W, varlen, T_per_rank=16, D=5, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B = 1 if varlen else 2
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    c = {"x": rnd(B, T_per_rank * W, D), "w": rnd(D, k), "b": rnd(D), "wy": rnd(B, T_per_rank * W, D)}
    # doc_bounds puts starts on rank edges, zigzag segment edges and inside segments; add starts 2 tokens before
    # the last contiguous rank edge and the last zigzag segment edge, so a halo is partly of the same document
    T = T_per_rank * W
    extra = [T_per_rank * (W - 1) - 2, T - T_per_rank // 2 - 2] if W > 1 else []
    bounds = sorted(set(doc_bounds(W, T) + extra))
    c["cu"] = torch.tensor(bounds, dtype=torch.int32) if varlen else None
    return c


def conv_reference(c):
    x, w, b = (c[n].clone().requires_grad_() for n in ("x", "w", "b"))
    rows = [short_conv(x[i : i + 1], w, b, cu_seqlens=c["cu"]) for i in range(x.shape[0])]
    y = torch.cat(rows)
    (y * c["wy"]).sum().backward()
    return {"y": y.detach(), "x": x.grad, "w": w.grad, "b": b.grad}


def run_sp_conv(c, sp):
    x, w, b = (c[n].clone().requires_grad_() for n in ("x", "w", "b"))
    y = sp_short_conv(sp.shard(x), w, b, sp=sp, cu_seqlens=c["cu"])
    (y * sp.shard(c["wy"])).sum().backward()
    grads = {"x": x.grad, "w": w.grad, "b": b.grad}
    if not sp.emulated:
        for t in grads.values():
            dist.all_reduce(t)
    return {"y": sp.gather(y.detach()), **grads}
