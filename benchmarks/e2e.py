"""End-to-end training-step benchmark of HybridLM: throughput, MFU and memory per rank vs pattern, length and SP.

    python benchmarks/e2e.py                      # CPU default: 5 patterns x 512, 2048 tokens/rank x SP 1, 2, 4 (gloo)
    python benchmarks/e2e.py --quick              # CI smoke (seconds)
    python benchmarks/e2e.py --device cuda --tokens 2048,8192,32768,65536 --emulated   # one GPU, virtual ranks

One step = forward + backward + AdamW step. For every (pattern, tokens per rank, W):
* step_s: best of `--repeats` step times (best, not median: the box is shared and the minimum is the least
  disturbed); gloo: the max over ranks, each rank a process with `--threads` threads; tok/s/rank = tokens per
  rank / step_s;
* MFU = tok/s/rank · flops_per_token(cfg, global T) / peak, with `peak` the fp32 matmul FLOP/s measured at the start
  of the same run on one rank's thread budget (CPU) or given by --peak-tflops (GPU);
* act_MB/rank: bytes of the tensors autograd saves for backward during the forward (saved_tensors_hooks, unique
  storages, parameters excluded): the activation memory that grows with tokens. Parameters + grads + AdamW
  state (16 bytes / parameter) are the same on every rank and shown once. On CUDA also cuda_peak_MB/rank, the
  allocator peak of a whole step (divided by W when emulated);
* recv_MB/rank: bytes received by the rank in one step, counted by lsp.parallel's comm layer, split into the linear
  layers' state exchange and the softmax layers' K,V all-gather.
The last table is the emulation overhead: time per token with SPContext(emulate=W) vs W = 1 at equal tokens per
rank (and vs sp=None on the same global tokens).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, print_table, sync  # noqa: E402

from lsp.models import HybridConfig, HybridLM, flops_per_token, num_parameters  # noqa: E402
from lsp.parallel import SPContext, comm_stats, reset_comm_stats, spawn  # noqa: E402

PATTERNS = ("S", "LS", "LLLS", "LLLLLLLS", "L")
MB = 2 ** 20


def matmul_peak(device: str, n: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 matmul FLOP/s (best of `repeats`) on this process's threads."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


class SavedBytes:
    """Counts the unique storages autograd saves for backward (parameters excluded) while active."""

    def __init__(self, model: torch.nn.Module):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in self.skip and st.device.type != "meta":
            self.seen[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self):
        self.seen.clear()
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def model_config(args, pattern: str) -> HybridConfig:
    return HybridConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                        layer_pattern=pattern, linear_attn=args.linear_attn)


def prepare(args, pattern: str, tokens: int, sp: SPContext | None, device: str):
    """Model, optimiser and data for one (pattern, tokens per rank) point; one warm-up step that also counts the
    saved activations and the step's communication. Returns (step, info)."""
    torch.manual_seed(0)
    cfg = model_config(args, pattern)
    model = HybridLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    W = 1 if sp is None else sp.world_size
    ids = torch.randint(0, args.vocab, (1, tokens * W), generator=torch.Generator().manual_seed(1)).to(device)
    labels = ids.roll(-1, dims=1)
    if sp is not None:
        ids, labels = sp.shard(ids, dim=1), sp.shard(labels, dim=1)
    counter = SavedBytes(model)

    def step(count: bool = False):
        with counter if count else contextlib.nullcontext():
            out = model(ids, labels=labels, sp=sp)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)

    reset_comm_stats()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    step(count=True)
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else 0
    tags = comm_stats()["tags"]
    recv = lambda pred: sum(c["bytes_recv"] for t, c in tags.items() if pred(t))  # noqa: E731
    R = 1 if sp is None else sp.rows
    return step, {"act_bytes": counter.total / R, "recv_kv": recv(lambda t: t.startswith("softmax")) / R,
                  "recv_state": recv(lambda t: not t.startswith("softmax")) / R,
                  "flops_per_token": flops_per_token(cfg, tokens * W), "params": num_parameters(model),
                  "cuda_peak": cuda_peak / R}


def timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def measure(args, pattern: str, tokens: int, sp: SPContext | None, device: str) -> dict:
    """One point: the best of `repeats` step times (the least disturbed by other load) and the counters."""
    step, info = prepare(args, pattern, tokens, sp, device)
    return {"step_s": min(timed(step) for _ in range(args.repeats)), **info}


def sweep(args, sp, device) -> list[dict]:
    return [dict(pattern=pat, tokens=T, **measure(args, pat, T, sp, device))
            for pat in args.patterns.split(",") for T in map(int, args.tokens.split(","))]


def _gloo_worker(rank, world_size, args):
    return sweep(args, SPContext(layout="zigzag"), "cpu")


def run_world(args, W: int) -> list[dict]:
    if W == 1 and not args.emulated:
        return sweep(args, None, args.device)
    if args.emulated:
        return sweep(args, SPContext(emulate=W, layout="zigzag"), args.device)
    per_rank = spawn(_gloo_worker, W, args, threads=args.threads, timeout_s=1800)
    rows = per_rank[0]
    for r, row in enumerate(rows):  # time, memory and traffic: the max over ranks (zigzag balances them)
        for key in ("step_s", "act_bytes", "recv_kv", "recv_state", "cuda_peak"):
            row[key] = max(p[r][key] for p in per_rank)
    return rows


def emulation_overhead(args) -> list[dict]:
    """Per-token step time of SPContext(emulate=W) vs W=1 at equal tokens per rank, and vs sp=None on W·T tokens.
    The three runs are timed interleaved (best of `repeats` rounds), so a change of machine load hits all three."""
    out = []
    T, W = args.emu_tokens, args.emu_world
    for pat in args.emu_patterns.split(","):
        runs = {"w1": (prepare(args, pat, T, SPContext(emulate=1), args.device)[0], T),
                "wN": (prepare(args, pat, T, SPContext(emulate=W), args.device)[0], W * T),
                "none": (prepare(args, pat, T * W, None, args.device)[0], W * T)}
        best = {k: float("inf") for k in runs}
        for _ in range(max(args.repeats, 2)):
            for k, (step, n) in runs.items():
                best[k] = min(best[k], timed(step) / n)
        out.append({"pattern": pat, "tokens/rank": T, "us/token W=1": round(best["w1"] * 1e6, 1),
                    f"us/token W={W} emulated": round(best["wN"] * 1e6, 1),
                    f"ratio W={W}/W=1": round(best["wN"] / best["w1"], 3),
                    f"us/token sp=None on {W}x{T}": round(best["none"] * 1e6, 1),
                    "ratio emulated/sp=None": round(best["wN"] / best["none"], 3)})
    return out


def plot(rows: list[dict], prefix: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = max(r["tokens"] for r in rows)
    pats = [p for p in PATTERNS if any(r["pattern"] == p for r in rows)]
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for pat in pats:
        pts = sorted((r["W"], r["act_MB/rank"], r["tok/s/rank"])
                     for r in rows if r["pattern"] == pat and r["tokens"] == T)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=pat)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=pat)
    for ax, name in zip(axes, ("saved activations per rank (MB)", "tokens/s per rank")):
        ax.set_xlabel("SP world size W")
        ax.set_ylabel(name)
        ax.set_xticks(sorted({r["W"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{T} tokens per rank: memory per rank vs W", fontsize=9)
    axes[1].set_title(f"{T} tokens per rank: throughput per rank vs W", fontsize=9)
    axes[0].legend(fontsize=8, title="pattern")
    fig.tight_layout()
    paths.append(f"{prefix}_scaling.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--tokens", default="512,2048", help="tokens per rank (comma list)")
    p.add_argument("--world", default="1,2,4", help="SP world sizes (comma list)")
    p.add_argument("--emulated", action="store_true", help="virtual ranks SPContext(emulate=W) instead of gloo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--linear-attn", default="gla")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak FLOP/s for MFU (default: measured matmul)")
    p.add_argument("--emu-patterns", default="L,LLLS")
    p.add_argument("--emu-tokens", type=int, default=512)
    p.add_argument("--emu-world", type=int, default=8)
    p.add_argument("--plot", default="docs/img/e2e", help="PNG path prefix ('' = no plot)")
    p.add_argument("--json", default="")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.patterns, args.tokens, args.world, args.repeats = "LLLS,L", "128", "1,2", 1
        args.hidden, args.layers, args.heads, args.vocab = 32, 4, 2, 64
        args.emu_patterns, args.emu_tokens, args.emu_world = "L", 64, 2
    torch.set_num_threads(args.threads)
    peak = args.peak_tflops * 1e12 or matmul_peak(args.device)
    cfg = model_config(args, "LLLS")
    print(f"device: {device_name(args.device)}; model d={cfg.hidden_size}, {cfg.num_layers} layers, "
          f"{cfg.num_heads} heads x {cfg.head_dim}, vocab {cfg.vocab_size}, {args.linear_attn}; "
          f"peak for MFU {peak / 1e9:.1f} GFLOP/s ({'given' if args.peak_tflops else 'measured fp32 matmul'}); "
          f"SP {'emulated' if args.emulated else 'gloo processes'}, zigzag layout")
    rows = []
    for W in map(int, args.world.split(",")):
        for r in run_world(args, W):
            tps = r["tokens"] / r["step_s"]
            rows.append({"pattern": r["pattern"], "tokens": r["tokens"], "W": W, "step_s": round(r["step_s"], 3),
                         "tok/s/rank": round(tps, 1), "MFU_%": round(100 * tps * r["flops_per_token"] / peak, 2),
                         "act_MB/rank": round(r["act_bytes"] / MB, 2),
                         "recv_MB state": round(r["recv_state"] / MB, 3), "recv_MB K,V": round(r["recv_kv"] / MB, 3),
                         "params": r["params"]})
            if args.device.startswith("cuda"):  # allocator peak of the whole step (params, grads, AdamW included)
                rows[-1]["cuda_peak_MB/rank"] = round(r["cuda_peak"] / MB, 1)
    for pat in args.patterns.split(","):
        sel = [{k: v for k, v in r.items() if k not in ("pattern", "params")} for r in rows if r["pattern"] == pat]
        params = next(r["params"] for r in rows if r["pattern"] == pat)
        print_table(sel, f"pattern {pat}: {params / 1e6:.2f} M params, + {16 * params / MB:.1f} MB "
                         f"params/grads/AdamW per rank")
    emu = emulation_overhead(args)
    print_table(emu, "Emulated SP overhead (equal tokens per rank)")
    if args.plot:
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        print("\nplots:", ", ".join(plot(rows, args.plot)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "emulation": emu, "peak": peak}, f, indent=1)
    return rows, emu


if __name__ == "__main__":
    main()
