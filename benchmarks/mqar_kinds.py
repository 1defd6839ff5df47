"""MQAR recall over every registered linear layer kind, at one parameter count, over several seeds.

    nice -n 10 python benchmarks/mqar_kinds.py --seeds 0,1,2 --cache benchmarks/results/mqar_kinds.jsonl  # docs 6
    python benchmarks/mqar_kinds.py --quick                # CI smoke (seconds): every kind, a few steps
    # docs section 5's study (GLA vs Gated DeltaNet, 8 layers, 400 steps):
    python benchmarks/mqar_kinds.py --kinds gla,gated_deltanet --patterns L,LLLS,LS --layers 8 --kv-pairs 8 \
        --queries 8 --num-keys 32 --num-values 32 --steps 400 --batch 32 --lr 5e-3

The hybrid-ratio study (benchmarks/hybrid_ratio.py: the same task, optimiser, data order and steps for every
model, its `train_one`) repeated for each kind of `lsp.models.layer_kinds()` (a kind registered later joins by
itself) and each pattern, plus the all-softmax reference once per seed. Every model's MLP width is chosen so that
its parameter count is the closest to one target, the all-linear model of --match-kind (a kind with more mixer
weights gets a narrower MLP). Each finished run is appended to --cache as one JSON line, tagged with the study's
settings: a rerun (more seeds, a newly registered kind) trains only the rows the cache lacks for those settings.
Prints the table of runs and a summary (mean ± spread over seeds, spread = half the max - min range), draws the
recall of every run per kind and pattern.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hybrid_ratio  # noqa: E402
from common import print_table  # noqa: E402
from hybrid_ratio import add_study_args  # noqa: E402

from lsp.models import layer_kinds  # noqa: E402

PATTERNS = ("L", "LS")   # of 2 layers: all-linear, 1:1 (LLLS, 3:1, needs --layers 4)
REFERENCE = "-"   # the linear_attn column of the all-softmax reference (it has no linear layer)
# the settings a cached row was trained under: a row is reused only by a study with all of them equal
SETUP_KEYS = ("layers", "hidden", "heads", "seq_len", "kv_pairs", "queries", "num_keys", "num_values", "steps",
              "batch", "eval_samples", "lr", "match_kind")


def setup_of(args) -> str:
    return json.dumps({k: getattr(args, k) for k in SETUP_KEYS}, sort_keys=True)


def load_cache(path: str, setup: str) -> dict:
    """{(linear_attn, pattern, seed): row} of the cached runs trained under `setup`."""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {(r["linear_attn"], r["pattern"], r["seed"]): r for r in rows if r.get("setup") == setup}


def planned_runs(args) -> list[tuple]:
    """(linear_attn, pattern, seed) in training order: one pattern over all seeds before the next, so an
    interrupted study has whole patterns; the all-softmax reference first."""
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [(REFERENCE, "S", s) for s in seeds] if args.softmax_reference else []
    return runs + [(k, p, s) for p in args.patterns.split(",") for s in seeds for k in args.kinds.split(",")]


def run(args) -> list[dict]:
    """One row per planned run: from the cache when it has it, else trained (and appended to the cache)."""
    setup = setup_of(args)
    cached, rows = load_cache(args.cache, setup), []
    for kind, pattern, seed in planned_runs(args):
        row = cached.get((kind, pattern, seed))
        if row is None:
            row = train(kind, pattern, seed, args)
            if args.cache:
                with open(args.cache, "a") as f:
                    f.write(json.dumps({**row, "setup": setup}) + "\n")
            print(row, flush=True)
        rows.append({k: v for k, v in row.items() if k != "setup"})
    return rows


def train(kind: str, pattern: str, seed: int, args) -> dict:
    study = argparse.Namespace(**{**vars(args), "linear_attn": args.match_kind if kind == REFERENCE else kind})
    return {"linear_attn": kind, **hybrid_ratio.train_one(pattern, study, seed)}


def summary(rows: list[dict]) -> list[dict]:
    """Mean ± spread over seeds per (kind, pattern); spread = (max - min) / 2, so mean ± spread spans the seeds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["linear_attn"], r["pattern"]), []).append(r)
    out = []
    for (kind, pattern), rs in groups.items():
        acc, loss = [r["recall_acc"] for r in rs], [r["final_loss"] for r in rs]
        out.append({"linear_attn": kind, "pattern": pattern, "params": rs[0]["params"], "seeds": len(rs),
                    "recall_mean": round(statistics.mean(acc), 4), "recall_spread": round((max(acc) - min(acc)) / 2, 4),
                    "loss_mean": round(statistics.mean(loss), 4), "loss_spread": round((max(loss) - min(loss)) / 2, 4),
                    "train_s_mean": round(statistics.mean(r["train_s"] for r in rs), 1)})
    return out


def plot(rows: list[dict], path: str, title: str, chance: float) -> None:
    """Recall per kind (x), one marker per run, one colour per pattern; the all-softmax runs as the last column."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["linear_attn"] for r in rows))
    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(kinds) + 2), 4.0))
    for j, pattern in enumerate(patterns):
        mine = [r for r in rows if r["pattern"] == pattern]
        offset = (j - (len(patterns) - 1) / 2) * 0.22
        xs = [kinds.index(r["linear_attn"]) + offset for r in mine]
        ax.scatter(xs, [r["recall_acc"] for r in mine], s=22, alpha=0.8,
                   label=f"{hybrid_ratio.PATTERNS.get(pattern, pattern)} ({pattern})")
        for s in summary(mine):
            x = kinds.index(s["linear_attn"]) + offset
            ax.plot([x - 0.09, x + 0.09], [s["recall_mean"]] * 2, color="black", lw=1)
    labels = ["softmax" if k == REFERENCE else k for k in kinds]
    hybrid_ratio.finish_plot(fig, ax, path, title, chance, list(range(len(kinds))), labels, legend_size=7,
                             xlabel="linear layer kind (dots: seeds; bar: mean)", legend_loc="center left")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke: every kind, pattern L, a few steps")
    p.add_argument("--kinds", default=",".join(layer_kinds()))
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--match-kind", default="gla", help="every model is matched to this kind's all-linear model")
    p.add_argument("--no-softmax-reference", dest="softmax_reference", action="store_false")
    p.add_argument("--cache", default="", help="JSON-lines file of finished runs: reused, and appended to")
    add_study_args(p, "docs/img/mqar_kinds.png")
    # configs/tiny-cpu.yaml's task and model size (2 layers, d=64; 4 pairs, 16 queries, 16 keys, 64 values)
    p.set_defaults(layers=2, kv_pairs=4, queries=16, num_keys=16, num_values=64, steps=800, batch=16, lr=3e-3)
    args = p.parse_args(argv)
    args.match_params = True
    if args.quick:
        args.patterns, args.steps, args.layers, args.seq_len = "L", 2, 2, 32
        hybrid_ratio.quick_task(args)
    torch.set_num_threads(args.threads)
    title = (f"MQAR T={args.seq_len}, {args.kv_pairs} kv pairs, {args.queries} queries, {args.layers} layers "
             f"d={args.hidden}, {args.steps} steps x {args.batch}, params matched to all-{args.match_kind}")
    rows = hybrid_ratio.run_study(args, lambda: run(args), title, plot)
    print_table(summary(rows), "summary over seeds (spread = (max - min) / 2)")
    return rows


if __name__ == "__main__":
    main()
