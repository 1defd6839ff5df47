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
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hybrid_ratio  # noqa: E402
from hybrid_ratio import add_study_args  # noqa: E402

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
            mine = sorted((r for r in rows if r["linear_attn"] == kind and r["seed"] == seed),
                          key=lambda r: r["softmax_layers"])
            mine += [r for r in reference if r["seed"] == seed]
            ax.plot([r["softmax_layers"] for r in mine], [r["recall_acc"] for r in mine], "o-",
                    label=f"{kind}, seed {seed}")
    ticks = sorted({(r["softmax_layers"], r["ratio"]) for r in rows})
    hybrid_ratio.finish_plot(fig, ax, path, title, chance, [t[0] for t in ticks],
                             [f"{t[1]}\n({t[0]} S)" for t in ticks], legend_size=7)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke: 1 pattern per kind, a few steps")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--no-softmax-reference", dest="softmax_reference", action="store_false")
    add_study_args(p, "docs/img/mqar_delta.png")
    args = p.parse_args(argv)
    args.match_params = True
    if args.quick:
        args.patterns, args.steps, args.layers, args.seq_len, args.softmax_reference = "LS", 3, 2, 32, False
        hybrid_ratio.quick_task(args)
    torch.set_num_threads(args.threads)
    title = (f"MQAR T={args.seq_len}, {args.kv_pairs} kv pairs, {args.layers} layers d={args.hidden}, "
             f"{args.steps} steps x {args.batch}, params matched to all-GLA")
    return hybrid_ratio.run_study(args, lambda: run(args), title, plot)

if __name__ == "__main__":
    main()
