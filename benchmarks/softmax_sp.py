"""SP softmax attention (LASP-2H): the mask-free causal path against the masked path, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/softmax_sp.py                  # W = 2, 4, 8 emulated, 1024 tokens per rank
    python benchmarks/softmax_sp.py --device cuda --tokens-per-rank 8192

Both paths compute the same causal attention over the all-gathered K, V (outputs agree to round-off, checked here):
`mask` is what a one-document `cu_seqlens` takes (a boolean [T_local, T] document/causal mask handed to SDPA, the
path every causal layer took before), `mask-free` attends each local segment to its causal key prefix
(`lsp.ops.softmax.causal_suffix_attention`). Per rank: tensors saved for backward during the forward (unique
storages, inputs excluded) and the fwd+bwd time, best of N with the two paths interleaved.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import device_name, print_table, sync  # noqa: E402
from e2e import SavedBytes  # noqa: E402

from lsp.parallel import SPContext, sp_softmax_attention  # noqa: E402


def run(W, args, device):
    sp = SPContext(emulate=W, layout="zigzag")
    gen = torch.Generator().manual_seed(0)
    T_local, H, Hkv, D = args.tokens_per_rank, args.heads, args.kv_heads, args.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(W, T_local, h, D, generator=gen).to(device, dtype).requires_grad_(True)
               for h in (H, Hkv, Hkv))
    one_doc = torch.tensor([0, W * T_local], dtype=torch.int32, device=device)
    paths = {"mask": dict(cu_seqlens=one_doc), "mask-free": {}}

    def step(kw, counter=None):
        if counter is None:
            o = sp_softmax_attention(q, k, v, sp=sp, **kw)
        else:
            with counter:
                o = sp_softmax_attention(q, k, v, sp=sp, **kw)
        o.float().square().mean().backward()
        return o.detach()

    outs, saved, times = {}, {}, {name: [] for name in paths}
    for name, kw in paths.items():
        counter = SavedBytes(torch.nn.Module())
        counter.skip = {x.untyped_storage().data_ptr() for x in (q, k, v)}   # count what the op adds
        outs[name] = step(kw, counter)
        saved[name] = counter.total / W
    err = ((outs["mask"].float() - outs["mask-free"].float()).abs().max() / outs["mask"].float().abs().max()).item()
    for _ in range(args.repeats):
        for name, kw in paths.items():
            sync(device)
            t0 = time.perf_counter()
            step(kw)
            sync(device)
            times[name].append((time.perf_counter() - t0) / W)
    best = {name: min(t) for name, t in times.items()}
    return {"W": W, "T": W * T_local, "saved MB/rank mask": saved["mask"] / 2**20,
            "saved MB/rank mask-free": saved["mask-free"] / 2**20, "memory ratio": saved["mask"] / saved["mask-free"],
            "ms/rank mask": 1e3 * best["mask"], "ms/rank mask-free": 1e3 * best["mask-free"],
            "speedup": best["mask"] / best["mask-free"], "max rel diff": err}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="2,4,8")
    p.add_argument("--tokens-per-rank", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="W=2, 128 tokens per rank, 1 repeat (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.world, args.tokens_per_rank, args.repeats = "2", 128, 1
    device = torch.device(args.device)
    print(f"device: {device_name(device)}; zigzag, emulated ranks, tokens/rank={args.tokens_per_rank}, "
          f"H={args.heads} Hkv={args.kv_heads} D={args.head_dim}; fwd+bwd per rank, best of {args.repeats}")
    rows = [run(int(W), args, device) for W in args.world.split(",")]
    print_table(rows, "SP softmax: masked vs mask-free causal path")
    return rows


if __name__ == "__main__":
    main()
