"""Shared cases for the SP tests: random inputs, the single-device reference, and the SP run (emulated or real)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from lsp.ops import linear_attention
from lsp.parallel import METHODS, SPContext, sp_linear_attention  # noqa: F401  (METHODS: the registered methods, for the matrices)

FORMS = ("none", "head", "scalar", "key")


def doc_bounds(W: int, T: int) -> list[int]:
    """Boundaries exactly on a rank edge, on a zigzag segment edge, and inside segments."""
    Ts = T // (2 * W)
    inner = [b for b in (5, Ts, T // W if W > 1 else Ts + 3, 2 * Ts + 3, T - 7) if 0 < b < T]
    return sorted(set([0] + inner + [T]))


def make_case(W, form, varlen, dtype=torch.float64, seed=0, T_per_rank=32, H=2, K=8, V=6):
    gen = torch.Generator().manual_seed(seed)
    B = 1 if varlen else 2
    T = T_per_rank * W
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    c = {"q": rnd(B, T, H, K), "k": rnd(B, T, H, K), "v": rnd(B, T, H, V)}
    decay = {"none": None, "head": (H,), "scalar": (B, T, H), "key": (B, T, H, K)}[form]
    c["g"] = None if decay is None else -0.3 * torch.rand(*decay, generator=gen, dtype=torch.float64).to(dtype)
    c["cu"] = torch.tensor(doc_bounds(W, T), dtype=torch.int32) if varlen else None
    N = B if not varlen else c["cu"].numel() - 1
    c["h0"] = rnd(N, H, K, V)
    c["wo"], c["wf"] = rnd(B, T, H, V), rnd(N, H, K, V)
    return c


def _leaves(c, trained=("q", "k", "v", "g", "h0")):
    # inputs as leaves; only the `trained` ones require grad (the others are frozen)
    return {n: c[n].clone().requires_grad_(n in trained) for n in ("q", "k", "v", "g", "h0") if c[n] is not None}


def reference(c, backend="naive"):
    """Outputs and gradients of the single-device op on the full sequence (loss = Σ o·wo + Σ final·wf), by
    default the step-by-step recurrence (the reference every test trusts)."""
    x = _leaves(c)
    o, f = linear_attention(x["q"], x["k"], x["v"], x.get("g"), initial_state=x["h0"], output_final_state=True,
                            cu_seqlens=c["cu"], backend=backend)
    ((o * c["wo"]).sum() + (f * c["wf"]).sum()).backward()
    return {"o": o.detach(), "final": f.detach(), **{n: t.grad for n, t in x.items()}}


def run_sp(c, sp: SPContext, method: str, scan_blocks: int = 3, trained=("q", "k", "v", "g", "h0"),
           backend="auto", autocast=None, with_final=True):
    """The same loss through sp_linear_attention; each rank's loss is its share, so Σ over ranks = the loss.

    Returns the gathered output, the final state (rank 0's copy) and the full gradients (summed over ranks) of the
    `trained` inputs (the others are frozen: their gradient is reported as zero). autocast: a dtype to run the
    forward under torch.autocast (backward outside it, as a trainer does).
    """
    x = _leaves(c, trained)
    W = sp.world_size
    g = x.get("g")
    g_loc = g if g is None or g.dim() == 1 else sp.shard(g)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        o, f = sp_linear_attention(sp.shard(x["q"]), sp.shard(x["k"]), sp.shard(x["v"]), g_loc, sp=sp,
                                   method=method, initial_state=x["h0"], output_final_state=with_final,
                                   cu_seqlens=c["cu"], scan_blocks=scan_blocks, backend=backend)
    loss = (o * sp.shard(c["wo"])).sum()
    if with_final:   # every replica of final contributes wf / W: the replicas' gradients are summed (Σ = one term)
        fr = f.reshape(sp.rows, *c["wf"].shape)
        loss = loss + (fr * c["wf"]).sum() / W
    loss.backward()
    # a rank that holds no first token of a sequence gets no initial_state gradient (None): count it as zero
    grads = {n: (t.grad if t.grad is not None else torch.zeros_like(t)) for n, t in x.items()}
    if not sp.emulated:
        for t in grads.values():
            dist.all_reduce(t)
    out = {"o": sp.gather(o.detach()), **grads}
    return {**out, "final": fr[0].detach()} if with_final else out


def max_rel_err(got: dict, ref: dict) -> dict:
    return {n: ((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)).item() for n in ref}


def make_softmax_case(W, varlen, dtype=torch.float64, seed=1, T_per_rank=16, H=4, Hkv=2, D=8):
    gen = torch.Generator().manual_seed(seed)
    B = 1 if varlen else 2
    T = T_per_rank * W
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    c = {"q": rnd(B, T, H, D), "k": rnd(B, T, Hkv, D), "v": rnd(B, T, Hkv, D), "wo": rnd(B, T, H, D)}
    c["cu"] = torch.tensor(doc_bounds(W, T), dtype=torch.int32) if varlen else None
    return c


def softmax_reference(c, causal=True):
    from lsp.ops import softmax_attention

    x = {n: c[n].clone().requires_grad_() for n in ("q", "k", "v")}
    o = softmax_attention(x["q"], x["k"], x["v"], causal=causal, cu_seqlens=c["cu"])
    (o * c["wo"]).sum().backward()
    return {"o": o.detach(), **{n: t.grad for n, t in x.items()}}


def run_sp_softmax(c, sp: SPContext, causal=True):
    from lsp.parallel import sp_softmax_attention

    x = {n: c[n].clone().requires_grad_() for n in ("q", "k", "v")}
    o = sp_softmax_attention(sp.shard(x["q"]), sp.shard(x["k"]), sp.shard(x["v"]), sp=sp, causal=causal,
                             cu_seqlens=c["cu"])
    (o * sp.shard(c["wo"])).sum().backward()
    grads = {n: t.grad for n, t in x.items()}
    if not sp.emulated:
        for t in grads.values():
            dist.all_reduce(t)
    return {"o": sp.gather(o.detach()), **grads}
