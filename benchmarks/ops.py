"""Linear-attention op benchmark: backend x T x decay form, forward and forward+backward.

    python benchmarks/ops.py                       # CPU: torch vs naive, T = 1K..16K
    python benchmarks/ops.py --device cuda         # GPU: triton vs SDPA-flash (and fla when importable)

Ratios are measured side by side in one run: on CPU `x naive` = naive time / backend time; on GPU `x sdpa` =
SDPA causal attention time / backend time, and `x fla` = fla's chunk kernel time / backend time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table, time_fn  # noqa: E402

from lsp.ops import linear_attention  # noqa: E402

FORMS = ("none", "head", "scalar", "key")


def make(form, B, T, H, K, V, device, dtype, requires_grad):
    q, k = (torch.randn(B, T, H, K, device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, device=device, dtype=dtype)
    g = {
        "none": None,
        "head": -torch.linspace(0.01, 0.5, H, device=device, dtype=torch.float32),
        "scalar": F.logsigmoid(torch.randn(B, T, H, device=device) + 3) / 16,
        "key": F.logsigmoid(torch.randn(B, T, H, K, device=device) + 3) / 16,
    }[form]
    tensors = [q * K**-0.5, k * K**-0.5, v, g]
    for x in tensors:
        if x is not None and requires_grad:
            x.requires_grad_(True)
    return tensors


def bench_case(fn, inputs, device, backward: bool, repeats: int) -> float:
    def step():
        o = fn(*inputs)
        if backward:
            o.float().sum().backward()

    with torch.set_grad_enabled(backward):
        return time_fn(step, device, warmup=1, repeats=repeats)


def fla_fn(form):
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    if form == "key":
        return lambda q, k, v, g: chunk_gla(q, k, v, g)[0]
    if form == "scalar":
        return lambda q, k, v, g: chunk_simple_gla(q, k, v, g)[0]
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", default=None, help="comma list of T (default CPU 1024..16384, GPU 1024..65536)")
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="K = V")
    p.add_argument("--naive-max-len", type=int, default=8192, help="skip the naive reference above this T")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else (
        [1024, 4096, 16384, 65536] if gpu else [1024, 2048, 4096, 8192, 16384])
    dtype = torch.bfloat16 if gpu else torch.float32
    B, H, K = 1, args.heads, args.dim
    print(f"device: {device_name(device)}; B={B} H={H} K=V={K} dtype={dtype}; times in ms (median of {args.repeats})")
    rows = []
    for form in args.forms.split(","):
        for T in lengths:
            for backward in (False, True):
                inputs = make(form, B, T, H, K, K, device, dtype, backward)
                row = {"form": form, "T": T, "pass": "fwd+bwd" if backward else "fwd"}
                backends = ["triton"] if gpu else ["torch"]
                ms = {}
                for be in backends:
                    fn = lambda q, k, v, g, be=be: linear_attention(q, k, v, g, backend=be)[0]  # noqa: E731
                    ms[be] = 1e3 * bench_case(fn, inputs, device, backward, args.repeats)
                    row[f"{be} ms"] = ms[be]
                if gpu:
                    qs, ks, vs = (x.detach().requires_grad_(backward) for x in inputs[:3])
                    sdpa = lambda q, k, v, g: F.scaled_dot_product_attention(  # noqa: E731
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
                    row["sdpa ms"] = 1e3 * bench_case(sdpa, [qs, ks, vs, None], device, backward, args.repeats)
                    row["x sdpa"] = row["sdpa ms"] / ms["triton"]
                    fla = fla_fn(form)
                    if fla is not None:
                        row["fla ms"] = 1e3 * bench_case(fla, inputs, device, backward, args.repeats)
                        row["x fla"] = row["fla ms"] / ms["triton"]
                    else:
                        row["fla ms"], row["x fla"] = "n/a", "n/a"
                elif T <= args.naive_max_len:
                    fn = lambda q, k, v, g: linear_attention(q, k, v, g, backend="naive")[0]  # noqa: E731
                    row["naive ms"] = 1e3 * bench_case(fn, inputs, device, backward, repeats=1)
                    row["x naive"] = row["naive ms"] / ms["torch"]
                else:
                    row["naive ms"], row["x naive"] = "skipped", "n/a"
                rows.append(row)
                print(row, flush=True)
    print_table(rows, "linear_attention")


if __name__ == "__main__":
    main()
