"""Sequence-parallel linear / softmax attention: measured bytes per rank and fwd+bwd step time per method.

    python benchmarks/sp.py                       # gloo W=1,2,4 and emulation, small CPU sizes
    python benchmarks/sp.py --world-sizes 1 2 --tokens-per-rank 512 --iters 5

Tokens per rank are fixed (weak scaling), so exact methods should keep bytes per rank flat in T and the step time
close to the W=1 time plus the exchange. Bytes come from lsp.parallel.comm_stats() (counted, not estimated).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lsp.parallel import SPContext, comm_stats, reset_comm_stats, sp_linear_attention, sp_softmax_attention, spawn  # noqa: E402

METHODS = ("allgather", "allscan", "ring", "softmax")


def make_inputs(sp, args, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W, B, H, K = sp.world_size, args.batch, args.heads, args.head_dim
    T = args.tokens_per_rank * W
    full = [torch.randn(B, T, H, K, generator=gen) for _ in range(3)]
    g = -0.1 * torch.rand(B, T, H, generator=gen)
    return [sp.shard(x).requires_grad_() for x in full], sp.shard(g).requires_grad_()


def step(sp, method, qkv, g, scan_blocks):
    q, k, v = qkv
    if method == "softmax":
        o = sp_softmax_attention(q, k, v, sp=sp)
    else:
        o, _ = sp_linear_attention(q, k, v, g, sp=sp, method=method, scan_blocks=scan_blocks)
    o.float().square().mean().backward()


def measure(sp, args, method):
    qkv, g = make_inputs(sp, args)
    barrier = (lambda: None) if sp.emulated else dist.barrier
    step(sp, method, qkv, g, args.scan_blocks)  # warm-up
    reset_comm_stats()
    step(sp, method, qkv, g, args.scan_blocks)
    stats = comm_stats()
    recv = stats["total"]["bytes_recv"] / sp.rows
    times = []
    for _ in range(args.iters):
        barrier()
        t0 = time.perf_counter()
        step(sp, method, qkv, g, args.scan_blocks)
        barrier()
        times.append(time.perf_counter() - t0)
    return {"bytes_recv_per_rank": recv, "step_ms": 1e3 * sorted(times)[len(times) // 2]}


def gloo_worker(rank, world_size, args):
    sp = SPContext(layout=args.layout)
    out = {m: measure(sp, args, m) for m in METHODS}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens-per-rank", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--scan-blocks", type=int, default=4)
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-gloo", action="store_true")
    args = p.parse_args(argv)
    print(f"B={args.batch} H={args.heads} K=V={args.head_dim} tokens/rank={args.tokens_per_rank} "
          f"layout={args.layout} scan_blocks={args.scan_blocks} iters={args.iters} (median step, fwd+bwd)\n")
    print("| mode | W | method | KiB recv / rank / step | step ms |")
    print("|---|---|---|---|---|")
    for W in args.world_sizes:
        modes = [("emulated", {m: measure(SPContext(emulate=W, layout=args.layout), args, m) for m in METHODS})]
        if not args.no_gloo:
            modes.append(("gloo", spawn(gloo_worker, W, args, timeout_s=600)[0]))
        for mode, res in modes:
            for m in METHODS:
                r = res[m]
                print(f"| {mode} | {W} | {m} | {r['bytes_recv_per_rank'] / 1024:.1f} | {r['step_ms']:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
