"""Functions run on real gloo ranks by tests/parallel/test_sp_gloo.py (module level so spawn can import them)."""
from __future__ import annotations

import torch

from lsp.parallel import SPContext, comm_stats, reset_comm_stats

from .cases import (
    FORMS,
    METHODS,
    make_case,
    make_softmax_case,
    max_rel_err,
    reference,
    run_sp,
    run_sp_softmax,
    softmax_reference,
)


def linear_subset(rank, world_size):
    """A representative subset on real ranks; returns the worst error per case and the allgather byte count."""
    errors = {}
    for layout in ("contiguous", "zigzag"):
        sp = SPContext(layout=layout)
        for form, varlen in (("none", False), ("head", True), ("scalar", False), ("key", True)):
            case = make_case(world_size, form, varlen)
            ref = reference(case)
            for method in METHODS:
                err = max_rel_err(run_sp(case, sp, method), ref)
                errors[(layout, form, varlen, method)] = max(err.values())
    case = make_case(world_size, "scalar", False, dtype=torch.float32)
    err32 = max(max_rel_err(run_sp(case, SPContext(layout="zigzag"), "allscan"), reference(case)).values())
    reset_comm_stats()
    run_sp(make_case(world_size, "scalar", False, dtype=torch.float32), SPContext(layout="contiguous"), "allgather")
    stats = comm_stats()["by_tag_op"]
    return {"errors": errors, "err32": err32, "allgather_recv": stats["allgather/all_gather"]["bytes_recv"]}


def softmax_subset(rank, world_size):
    errors = {}
    for layout in ("contiguous", "zigzag"):
        for varlen in (False, True):
            case = make_softmax_case(world_size, varlen)
            errors[(layout, varlen)] = max(max_rel_err(run_sp_softmax(case, SPContext(layout=layout)),
                                                       softmax_reference(case)).values())
    return errors


def reductions(rank, world_size):
    """all_reduce_sum: Σ forward, identity backward; gather: full sequence, backward = own slice of the gradient."""
    sp = SPContext(layout="zigzag")
    x = torch.tensor([float(rank + 1)], requires_grad=True)
    total = sp.all_reduce_sum(x * 2)
    total.backward()
    full = torch.arange(4 * world_size, dtype=torch.float64).reshape(1, -1)
    loc = sp.shard(full).requires_grad_()
    gathered = sp.gather(loc)
    (gathered * full).sum().backward()
    return {"sum": total.item(), "grad": x.grad.item(), "gather_ok": torch.equal(gathered.detach(), full),
            "gather_grad_ok": torch.equal(loc.grad, sp.shard(full))}


def both(rank, world_size):
    return linear_subset(rank, world_size), softmax_subset(rank, world_size), reductions(rank, world_size)


def fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank one")
    return rank




def frozen_inputs(rank, world_size):
    """Only initial_state trains (q, k, v, g frozen), then only q and g (k, v frozen): every rank must still join
    every backward collective. Returns the worst relative error of the trained gradients per (layout, method)."""
    errors = {}
    for layout in ("contiguous", "zigzag"):
        sp = SPContext(layout=layout)
        for form, varlen in (("scalar", False), ("key", True)):
            case = make_case(world_size, form, varlen)
            ref = reference(case)
            for method in METHODS:
                for trained in (("h0",), ("q", "g")):
                    got = run_sp(case, sp, method, trained=trained)
                    errors[(layout, form, method, trained)] = max(max_rel_err(
                        {n: got[n] for n in trained}, {n: ref[n] for n in trained}).values())
        # softmax (LASP-2H): only rank 0's keys and values train; every rank must still join the K,V backward
        case = make_softmax_case(world_size, False)
        ref = softmax_reference(case)
        x = {n: case[n].clone().requires_grad_(n == "q" or rank == 0) for n in ("q", "k", "v")}
        from lsp.parallel import sp_softmax_attention

        o = sp_softmax_attention(sp.shard(x["q"]), sp.shard(x["k"]), sp.shard(x["v"]), sp=sp)
        (o * sp.shard(case["wo"])).sum().backward()
        dq = x["q"].grad.clone()
        torch.distributed.all_reduce(dq)
        errors[(layout, "softmax", "allgather", ("q",))] = max_rel_err({"q": dq}, {"q": ref["q"]})["q"]
    return errors


def output_only(rank, world_size):
    """The loss uses only o (no final state): rank 0 of the contiguous layout holds only the first segment, whose
    rows need no correction, and must still join every method's backward. Worst relative error per method."""
    errors = {}
    for layout in ("contiguous", "zigzag"):
        case = make_case(world_size, "key", False)
        case["wf"] = torch.zeros_like(case["wf"])   # the reference's final-state term is zero
        ref = reference(case)
        for method in METHODS:
            got = run_sp(case, SPContext(layout=layout), method, trained=("q", "k", "v", "g"), with_final=False)
            errors[(layout, method)] = max(max_rel_err({n: got[n] for n in ("o", "q", "k", "v", "g")},
                                                       {n: ref[n] for n in ("o", "q", "k", "v", "g")}).values())
    return errors


__all__ = ["linear_subset", "softmax_subset", "both", "fail_on_rank_one", "frozen_inputs", "chain_overlap",
           "output_only", "FORMS"]


def chain_overlap(rank, world_size):
    """All-Scan on real ranks: the walk runs on its own thread while the local output (forward) and its gradient
    (backward) are computed. The patched local output waits for the walk to have started: if the walk ran after
    it, as before, the wait would time out. Returns the event log."""
    import threading

    import lsp.parallel.linear as lin
    import lsp.parallel.methods.chain as ex

    log, started = [], {"fwd": threading.Event(), "bwd": threading.Event()}
    walk, local_output = ex._Walker.run, lin.local_output

    def run(self, Y, a):
        d = "bwd" if self.tag.endswith(":bwd") else "fwd"
        log.append(("walk-start", d, threading.current_thread().name))
        started[d].set()
        return walk(self, Y, a)

    def output(*args, **kw):
        log.append(("o0-start",))
        got = started["fwd"].wait(10)
        o0 = local_output(*args, **kw)
        log.append(("o0-end", got))
        o0.register_hook(lambda g: log.append(("o0-grad", started["bwd"].wait(10))))
        return o0

    ex._Walker.run, lin.local_output = run, output
    case = make_case(world_size, "key", False, dtype=torch.float32, T_per_rank=256)
    run_sp(case, SPContext(layout="zigzag"), "allscan")
    return log
