"""Linear-attention op benchmark: backend x T x decay form, forward and forward+backward.

    python benchmarks/ops.py                       # CPU: torch vs naive, T = 1K..16K
    python benchmarks/ops.py --device cuda         # GPU: triton vs SDPA-flash (and fla when importable)
    python benchmarks/ops.py --device cuda --heads 16 --dim 128 --lengths 8192,32768,65536   # docs/ops.md roofline

Ratios are measured side by side in one run: on CPU `x naive` = naive time / backend time; on GPU `x sdpa` =
SDPA causal attention time (FlashAttention backend forced) / backend time, and `x fla` = fla's chunk kernel time /
backend time (fla's chunk_gla for per-key decay, chunk_simple_gla for the others; 'n/a' and one line saying why when
fla is not importable). `fla err` = max|o_lsp - o_fla| / max|o_fla| on the same inputs (a sanity check that both
compute the same op). The GPU run is in bf16.
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


def fla_fn(form, B, T, H):
    """fla's chunk kernel for the decay form (same [B, T, H, K] layout and default scale), or None."""
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as e:
        print(f"fla not importable ({e}): fla columns are n/a", flush=True)
        return None
    if form == "key":
        return lambda q, k, v, g: chunk_gla(q, k, v, g)[0]
    if form == "head":  # fla takes a per-token scalar decay: broadcast the per-head one
        return lambda q, k, v, g: chunk_simple_gla(q, k, v, g.expand(B, T, H).contiguous())[0]
    return lambda q, k, v, g: chunk_simple_gla(q, k, v, g)[0]


def sdpa_flash(q, k, v, g):
    # causal softmax attention on the FlashAttention backend (an error, not a silent fallback, if unavailable)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True)


# -- roofline: FLOPs and HBM bytes per 64-token chunk and head, read off the kernels (per-key decay, bf16) ----------
H100_FLOPS, H100_BYTES = 990e12, 3.35e12   # bf16 dense tensor-core FLOP/s, HBM bytes/s

def kernel_costs(C: int, K: int, V: int) -> dict[str, list[tuple[str, float, float]]]:
    """(kernel, dot FLOPs, HBM bytes) per chunk and head, forward and backward, for lsp (lsp/ops/linear/triton_*.py)
    and fla's chunk_gla (fla/ops/gla/chunk.py: chunk_gla_fwd / chunk_gla_bwd, h recomputed in backward). Bytes
    count each tensor a kernel reads or writes once per chunk (re-reads by sibling programs of a chunk, e.g. one per
    V block, are assumed to hit L2); elementwise work (exp, masks) is left out of the FLOPs."""
    e, f = 2, 4                                            # bf16 inputs, fp32 states / decays / gradients
    x, gk, A = C * K * e, C * K * f, C * C * f             # a [C, d] input tile (d = K = V), G, A or dA
    h16, h32, d32 = K * V * e, K * V * f, C * K * f        # chunk state bf16 / fp32, an fp32 gradient tile
    kv, kk, vv = 2 * C * K * V, 2 * C * C * K, 2 * C * C * V
    lsp_fwd = [("cumsum of g (torch)", 0, 2 * gk), ("_fwd_state_kernel (2-part key)", 2 * kv, 2 * x + gk + h16),
               ("_intra_scores_kernel", kk, 2 * x + gk + A), ("_out_kernel", kv + vv, 2 * x + gk + h16 + A)]
    lsp_bwd = lsp_fwd[:3] + [
        ("_dh_kernel", kv, 2 * x + gk + h16), ("_dqk_kernel", kv + vv, 2 * x + gk + h16 + d32 + A),
        ("_dv_kernel", vv, A + x + d32), ("_intra_dqk_kernel", 2 * kk, 2 * x + gk + A + 3 * d32),
        ("_bwd_state_kernel", 0, 2 * h16 + h32),
        ("_state_dkdv_kernel (+ output dv)", 2 * kv, 2 * x + gk + h32 + 3 * d32),
        ("_dg_kernel (both pieces, + dk sum)", 0, 2 * x + 5 * d32), ("casts (torch)", 0, 3 * d32 + 3 * x)]
    sub = 6 * 2 * 16 * 16 * K                              # fla forms only the 6 strictly-lower 16x16 blocks
    fla_fwd = [("chunk_local_cumsum", 0, 2 * gk), ("chunk_fwd_h", kv, 2 * x + gk + h16),
               ("chunk_gla_fwd_intra_gk (2 kernels)", sub, 2 * x + gk + 2 * A), ("chunk_gla_fwd_o_gk", kv + vv,
                                                                                 2 * x + gk + h16 + A)]
    fla_bwd = [("chunk_local_cumsum", 0, 2 * gk), ("chunk_fwd_h (fp32)", kv, 2 * x + gk + h32),
               ("chunk_gla_fwd_intra_gk (A)", sub, 2 * x + gk + 2 * A), ("chunk_bwd_dh", kv, 2 * x + gk + h32),
               ("chunk_gla_bwd_dv", vv + kv, 2 * x + gk + A + h32 + x), ("chunk_gla_bwd_dA", vv, 2 * x + A),
               ("chunk_gla_bwd_dqk_intra", 2 * sub, 2 * x + gk + A + 2 * d32),
               ("chunk_gla_bwd_dqkg", 2 * kv, 3 * x + gk + 2 * h32 + 5 * d32 + gk),
               ("reverse cumsum + casts", 0, 2 * gk + 2 * d32 + 2 * x)]
    return {"lsp fwd": lsp_fwd, "lsp bwd": lsp_bwd, "fla fwd": fla_fwd, "fla bwd": fla_bwd}


def roofline(C=64, K=128, V=128, H=16, lengths=(8192, 32768, 65536)) -> None:
    """Per kernel: FLOPs, bytes, intensity, predicted H100 time per chunk-head (max of compute and HBM time), and
    the predicted total per pass at each T (a prediction, to be confirmed with --device cuda)."""
    totals = {}
    for name, kernels in kernel_costs(C, K, V).items():
        rows, per_chunk = [], 0.0
        for kernel, flops, nbytes in kernels:
            t = max(flops / H100_FLOPS, nbytes / H100_BYTES)
            per_chunk += t
            rows.append({"kernel": kernel, "MFLOP": flops / 1e6, "KB": nbytes / 1024,
                         "FLOP/B": flops / nbytes, "ns (pred.)": t * 1e9})
        print_table(rows, f"{name}: per 64-token chunk and head, K = V = {K}, bf16")
        totals[name] = per_chunk
    rows = [{"T": T, **{f"{n} ms (pred.)": totals[n] * T / C * H * 1e3 for n in totals}} for T in lengths]
    print_table(rows, f"predicted H100 time, B = 1, H = {H}, K = V = {K} (990 TFLOP/s bf16, 3.35 TB/s)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", default=None, help="comma list of T (default CPU 1024..16384, GPU 1024..65536)")
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="K = V")
    p.add_argument("--naive-max-len", type=int, default=8192, help="skip the naive reference above this T")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--roofline", action="store_true", help="print the per-kernel H100 cost model and exit")
    args = p.parse_args(argv)
    if args.roofline:
        roofline(K=args.dim if args.dim != 64 else 128, V=args.dim if args.dim != 64 else 128, H=args.heads if
                 args.heads != 4 else 16)
        return
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
                    row["sdpa ms"] = 1e3 * bench_case(sdpa_flash, [qs, ks, vs, None], device, backward,
                                                      args.repeats)
                    row["x sdpa"] = row["sdpa ms"] / ms["triton"]
                    fla = fla_fn(form, B, T, H)
                    if fla is not None:
                        row["fla ms"] = 1e3 * bench_case(fla, inputs, device, backward, args.repeats)
                        row["x fla"] = row["fla ms"] / ms["triton"]
                        with torch.no_grad():
                            ref = fla(*inputs).float()
                            ours = linear_attention(*inputs, backend="triton")[0].float()
                        row["fla err"] = ((ours - ref).abs().max() / ref.abs().max()).item()
                    else:
                        row["fla ms"], row["x fla"], row["fla err"] = "n/a", "n/a", "n/a"
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
