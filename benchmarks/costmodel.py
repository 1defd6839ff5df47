"""Tables and a plot of the analytic SP cost model (lsp/plan/costmodel.py).

    python benchmarks/costmodel.py                          # markdown tables to stdout
    python benchmarks/costmodel.py --plot docs/img/sp_costmodel.png

Checks the two published ratios the model is fitted to and prints modelled step times for W = 8..1024 GPUs,
(a) at 8K tokens per GPU (weak scaling, up to 8M) and (b) at a fixed 8M-token sequence (strong scaling).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lsp.plan.costmodel import LABELS, METHODS, Hardware, ModelSpec, ratio, step_time  # noqa: E402

K_TOK = 1024
M_TOK = 1024 * 1024
WORLD_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024)


def published_checks() -> str:
    rows = [
        ("ZeCO All-Scan vs LASP-2, 8M tokens, 256 GPUs (ZeCO paper: ~1.6x)",
         ratio("allgather", "allscan", 256, 8 * M_TOK)),
        ("LASP-2 vs LASP-1, 2048K tokens, 64 GPUs (LASP-2 paper: 1.152x)",
         ratio("ring", "allgather", 64, 2048 * K_TOK)),
    ]
    lines = ["| published comparison | modelled speedup |", "|---|---|"]
    lines += [f"| {name} | {r:.2f}x |" for name, r in rows]
    return "\n".join(lines)


def table(seq_len_of, title: str, layout: str = "contiguous") -> str:
    head = "| W | T | " + " | ".join(f"{LABELS[m]} s" for m in METHODS) + " | All-Scan / LASP-2 speedup |"
    lines = [f"**{title}**", "", head, "|" + "---|" * (len(METHODS) + 3)]
    for W in WORLD_SIZES:
        T = seq_len_of(W)
        t = {m: step_time(m, W, T, layout=layout).total_s for m in METHODS}
        cells = " | ".join(f"{t[m]:.3f}" for m in METHODS)
        lines.append(f"| {W} | {T // K_TOK}K | {cells} | {t['allgather'] / t['allscan']:.2f}x |")
    return "\n".join(lines)


def plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (seq_len_of, title) in zip(axes, [(lambda W: 8 * K_TOK * W, "8K tokens / GPU (weak scaling)"),
                                               (lambda W: 8 * M_TOK, "8M-token sequence (strong scaling)")]):
        for m in METHODS:
            if m == "ringkv":
                continue  # off the scale (seconds to minutes); in the tables
            ys = [seq_len_of(W) / step_time(m, W, seq_len_of(W)).total_s / W for W in WORLD_SIZES]
            ax.plot(WORLD_SIZES, ys, marker="o", label=LABELS[m])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (W)")
        ax.set_ylabel("tokens / s / GPU (modelled)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SP linear attention, 1B model, H100-class GPUs (lsp/plan/costmodel.py)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    args = p.parse_args(argv)
    print(f"model: {ModelSpec()}\nhardware: {Hardware()}\n")
    print(published_checks() + "\n")
    print(table(lambda W: 8 * K_TOK * W, "Step time (s), 8K tokens per GPU (T up to 8M)") + "\n")
    print(table(lambda W: 8 * M_TOK, "Step time (s), 8M-token sequence") + "\n")
    print(table(lambda W: 8 * K_TOK * W, "Step time (s), 8K tokens per GPU, zigzag layout (lsp's default: two "
                "segments per rank)", layout="zigzag") + "\n")
    if args.plot:
        plot(args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
