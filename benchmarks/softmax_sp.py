"""SP softmax attention (LASP-2H), causal, with and without packed documents: saved bytes per rank (real gloo
ranks), fwd+bwd time per rank (emulated ranks) and the error against single-device attention.

    OMP_NUM_THREADS=1 python benchmarks/softmax_sp.py                    # W = 2, 4, 8; 1024 tokens/rank, 8 docs/rank
    OMP_NUM_THREADS=1 python benchmarks/softmax_sp.py --many-docs        # W = 4, 2048 tokens/rank, ~1000 documents
    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/older/checkout python benchmarks/softmax_sp.py   # same numbers, older code

Only the public API is used (`SPContext`, `sp_softmax_attention`, `softmax_attention`, `spawn`), so the same script
measures any checkout: the `lsp` it imports is printed first. Saved bytes: unique storages autograd keeps for
backward during one forward on rank 0 of W gloo processes, the inputs q, k, v excluded. Times: best of N emulated
fwd+bwd steps divided by W; on CPU this process's CPU time (`time.process_time`, one thread), because wall time
on a shared box moves 3x from run to run with the other jobs' load while CPU time repeats to a few percent.
`packed`: documents with random lengths (fixed seed) that cross rank and segment edges;
`equal docs`: documents of one length (batched into one kernel call per run of equal pieces).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # PYTHONPATH's lsp comes first

from common import device_name, print_table, sync  # noqa: E402
from e2e import SavedBytes  # noqa: E402

import lsp  # noqa: E402
from lsp.ops import softmax_attention  # noqa: E402
from lsp.parallel import SPContext, sp_softmax_attention, spawn  # noqa: E402


def doc_bounds(T: int, docs: int, kind: str) -> list[int] | None:
    """Global document boundaries: None (one causal sequence), `docs` random lengths, or `docs` equal lengths."""
    if kind == "causal":
        return None
    if kind == "equal docs":
        return [i * T // docs for i in range(docs + 1)]
    return [0] + sorted(random.Random(0).sample(range(1, T), docs - 1)) + [T]


def full_inputs(T, args, device, dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, T, h, args.head_dim, generator=gen).to(device, dtype) for h in
            (args.heads, args.kv_heads, args.kv_heads)]


def cu_tensor(bounds, device):
    return None if bounds is None else torch.tensor(bounds, dtype=torch.int32, device=device)


def saved_on_rank(rank, world_size, args, bounds):
    """Rank's saved-for-backward bytes of one forward (inputs excluded); W=1 runs in this process (one emulated
    rank is exactly one real rank)."""
    sp = SPContext(emulate=1, layout="zigzag") if world_size == 1 else SPContext(layout="zigzag")
    q, k, v = (sp.shard(x).requires_grad_(True) for x in full_inputs(world_size * args.tokens_per_rank, args,
                                                                       torch.device("cpu"), torch.float32))
    counter = SavedBytes(torch.nn.Module())
    counter.skip = {x.untyped_storage().data_ptr() for x in (q, k, v)}
    with counter:
        sp_softmax_attention(q, k, v, sp=sp, cu_seqlens=cu_tensor(bounds, q.device))
    return counter.total


def timed(W, args, device, bounds):
    """(best fwd+bwd seconds per rank, max relative difference to single-device attention)."""
    sp = SPContext(emulate=W, layout="zigzag")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    full = full_inputs(W * args.tokens_per_rank, args, device, dtype)
    q, k, v = (sp.shard(x).requires_grad_(True) for x in full)
    cu = cu_tensor(bounds, device)
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    times = []
    for _ in range(args.repeats):
        sync(device)
        t0 = clock()
        o = sp_softmax_attention(q, k, v, sp=sp, cu_seqlens=cu)
        o.float().square().mean().backward()
        sync(device)
        times.append((clock() - t0) / W)
    ref = softmax_attention(*full, cu_seqlens=cu).float()
    err = ((sp.gather(o.detach()).float() - ref).abs().max() / ref.abs().max()).item()
    return min(times), err


def run(W, kind, docs, args, device):
    T = W * args.tokens_per_rank
    bounds = doc_bounds(T, docs, kind)
    if W == 1 or not args.gloo:
        saved = saved_on_rank(0, 1, args, bounds) if W == 1 else float("nan")
    else:
        saved = spawn(saved_on_rank, W, args, bounds, timeout_s=600)[0]
    best, err = timed(W, args, device, bounds)
    return {"case": kind, "W": W, "T": T, "docs": 1 if bounds is None else len(bounds) - 1,
            "saved MB/rank": saved / 2**20, "fwd+bwd ms/rank": 1e3 * best, "max rel diff": err}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="2,4,8")
    p.add_argument("--tokens-per-rank", type=int, default=1024)
    p.add_argument("--docs-per-rank", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-gloo", dest="gloo", action="store_false", help="skip the saved-bytes runs on gloo ranks")
    p.add_argument("--many-docs", action="store_true", help="W=4, 2048 tokens/rank, 250 docs/rank (1000 in all)")
    p.add_argument("--quick", action="store_true", help="W=1, 256 tokens, 1 repeat, no processes (smoke test)")
    args = p.parse_args(argv)
    kinds = ("causal", "packed")
    if args.quick:
        args.world, args.tokens_per_rank, args.repeats = "1", 256, 1
    if args.many_docs:
        args.world, args.tokens_per_rank, args.docs_per_rank = "4", 2048, 250
        kinds = ("causal", "packed", "equal docs")
    device = torch.device(args.device)
    print(f"lsp: {os.path.dirname(lsp.__file__)}\ndevice: {device_name(device)}; zigzag, tokens/rank="
          f"{args.tokens_per_rank}, H={args.heads} Hkv={args.kv_heads} D={args.head_dim}; saved: rank 0 of W gloo "
          f"ranks (W=1: in process); time: emulated fwd+bwd per rank, best of {args.repeats}"
          f"{' (process CPU time)' if device.type == 'cpu' else ''}")
    rows = [run(int(W), kind, int(W) * args.docs_per_rank, args, device)
            for W in args.world.split(",") for kind in kinds]
    print_table(rows, "SP softmax (LASP-2H), causal")
    return rows


if __name__ == "__main__":
    main()
