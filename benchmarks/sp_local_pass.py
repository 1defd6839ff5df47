"""sp_linear_attention at W=1 vs the op it wraps: time (fwd+bwd) and bytes kept for backward, side by side.

At W=1 the exchange has nothing to send, so every extra cost is the SP wrapper itself: the local pass must be the
op's own (computed once, in the op's backend) and the correction must keep nothing sequence-sized. Targets: time
within 1.1x, saved bytes within 1.25x. Rounds are interleaved (op, SP, op, SP, ...) and the best of each is kept,
so a busy machine slows both alike.

    python benchmarks/sp_local_pass.py [--tokens 8192] [--heads 4] [--head-dim 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lsp.ops import linear_attention  # noqa: E402
from lsp.parallel import SPContext, sp_linear_attention  # noqa: E402
from lsp.plan.measure import saved_bytes  # noqa: E402

FORMS = {"none": None, "head": "H", "scalar": "BTH", "key": "BTHK"}


def inputs(form, B, T, H, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=gen).requires_grad_() for _ in range(3))
    shape = {"none": None, "head": (H,), "scalar": (B, T, H), "key": (B, T, H, D)}[form]
    g = None if shape is None else (-0.1 * torch.rand(*shape, generator=gen)).requires_grad_()
    return q, k, v, g


def run(fn, x):
    o = fn()
    o.sum().backward()
    for t in x:
        if t is not None:
            t.grad = None


def compare(form, args):
    q, k, v, g = inputs(form, 1, args.tokens, args.heads, args.head_dim)
    sp = SPContext(emulate=1, layout=args.layout)
    op = lambda: linear_attention(q, k, v, g, backend=args.backend)[0]  # noqa: E731
    spf = lambda: sp_linear_attention(q, k, v, g, sp=sp, backend=args.backend)[0]  # noqa: E731
    best = {"op": float("inf"), "sp": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("op", op), ("sp", spf)):
            t = time.perf_counter()
            run(fn, (q, k, v, g))
            best[name] = min(best[name], time.perf_counter() - t)
    mem = {"op": saved_bytes(op), "sp": saved_bytes(spf)}
    return {"form": form, "op fwd+bwd s": round(best["op"], 4), "sp W=1 s": round(best["sp"], 4),
            "time sp/op": round(best["sp"] / best["op"], 3), "saved MB op": round(mem["op"] / 2**20, 2),
            "saved MB sp": round(mem["sp"] / 2**20, 2), "saved sp/op": round(mem["sp"] / mem["op"], 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layout", default="contiguous")  # W=1 contiguous: the op's own shape
    p.add_argument("--backend", default="torch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--forms", default="none,head,scalar,key")
    args = p.parse_args(argv)
    rows = [compare(f, args) for f in args.forms.split(",")]
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r.values()) + " |")
    return rows


if __name__ == "__main__":
    main()
