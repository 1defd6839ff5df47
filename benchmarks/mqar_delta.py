"""MQAR recall: Gated DeltaNet vs GLA hybrids at equal parameter count, by linear:softmax pattern.

    nice python benchmarks/mqar_delta.py                   # 2 kinds x (L, LLLS, LS) + all-softmax, seed 0
    python benchmarks/mqar_delta.py --quick                # CI smoke (seconds)

The hybrid-ratio study (benchmarks/hybrid_ratio.py: same task, model size, optimiser, data order and steps, its
`train_one`) repeated with each linear kind. Every model's MLP width is chosen so that its parameter count is the
closest to one target, the all-linear GLA model's, whatever its linear kind (a Gated DeltaNet layer has the same
5 D² projections as a GLA layer; its beta / decay projections and short conv replace GLA's low-rank decay).
Writes a Markdown table and a PNG: recall accuracy vs number of softmax layers, one line per linear kind.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hybrid_ratio  # noqa: E402
from common import print_table  # noqa: E402

KINDS = ("gla", "gated_deltanet")
PATTERNS = ("L", "LLLS", "LS")


def run(args) -> list[dict]:
    """One row per (seed, kind, pattern), plus the all-softmax reference per seed (the same for both kinds)."""
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for kind in args.kinds.split(","):
            for pattern in args.patterns.split(","):
                study = argparse.Namespace(**{**vars(args), "linear_attn": kind, "match_kind": "gla"})
                rows.append({"linear_attn": kind, **hybrid_ratio.train_one(pattern, study, seed)})
                print(rows[-1], flush=True)
        if args.softmax_reference:
            study = argparse.Namespace(**{**vars(args), "linear_attn": "gla", "match_kind": "gla"})
            rows.append({"linear_attn": "-", **hybrid_ratio.train_one("S", study, seed)})
    return rows


def plot(rows: list[dict], path: str, title: str, chance: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    reference = [r for r in rows if r["pattern"] == "S"]
    for kind in dict.fromkeys(r["linear_attn"] for r in rows if r["pattern"] != "S"):
        for seed in sorted({r["seed"] for r in rows}):
            mine = sorted((r for r in rows if r["linear_attn"] == kind and r["seed"] == seed) or [],
                          key=lambda r: r["softmax_layers"])
            mine += [r for r in reference if r["seed"] == seed]
            ax.plot([r["softmax_layers"] for r in mine], [r["recall_acc"] for r in mine], "o-",
                    label=f"{kind}, seed {seed}")
    ax.axhline(chance, color="gray", ls="--", lw=1, label=f"chance (1/{round(1 / chance)})")
    ticks = sorted({(r["softmax_layers"], r["ratio"]) for r in rows})
    ax.set_xticks([t[0] for t in ticks], [f"{t[1]}\n({t[0]} S)" for t in ticks], fontsize=8)
    ax.set_xlabel("layer pattern (linear:softmax) and number of softmax layers")
    ax.set_ylabel("MQAR recall accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke: 1 pattern per kind, a few steps")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--no-softmax-reference", dest="softmax_reference", action="store_false")
    p.add_argument("--seeds", default="0")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--kv-pairs", type=int, default=8)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--num-keys", type=int, default=32)
    p.add_argument("--num-values", type=int, default=32)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", default="docs/img/mqar_delta.png", help="PNG path ('' = no plot)")
    p.add_argument("--json", default="", help="also write the rows as JSON here")
    p.add_argument("--from-json", default="", help="no training: table and plot from rows saved by --json")
    args = p.parse_args(argv)
    args.match_params = True
    if args.quick:
        args.patterns, args.steps, args.layers, args.seq_len, args.softmax_reference = "LS", 3, 2, 32, False
        args.kv_pairs = args.queries = 4
        args.batch, args.eval_samples = 4, 8
    torch.set_num_threads(args.threads)
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)
    else:
        rows = run(args)
    title = (f"MQAR T={args.seq_len}, {args.kv_pairs} kv pairs, {args.layers} layers d={args.hidden}, "
             f"{args.steps} steps x {args.batch}, params matched to all-GLA")
    print_table(rows, title)
    if args.plot:
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        plot(rows, args.plot, title, 1 / args.num_values)
        print(f"\nplot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
