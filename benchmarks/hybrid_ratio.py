"""Hybrid-ratio study: MQAR recall accuracy vs linear:softmax layer pattern at (about) equal parameter count.

    python benchmarks/hybrid_ratio.py                      # default CPU study (a few minutes on 2 cores)
    python benchmarks/hybrid_ratio.py --quick              # CI smoke (seconds)

Every pattern trains the same 8-layer HybridLM (only the attention kind per layer differs; a softmax layer has
4 D² attention weights, a GLA layer 5 D² + the low-rank decay, so the totals differ by a few percent and are
printed) on the built-in MQAR task (lsp.train.mqar.MQAR) with the same data order, optimiser and steps, then
measures recall accuracy (argmax at the queried-key positions) on held-out samples. Writes a Markdown table and a
PNG (accuracy vs number of softmax layers).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table  # noqa: E402

from lsp.models import HybridConfig, HybridLM, num_parameters  # noqa: E402
from lsp.run_config import DataConfig, MQARConfig  # noqa: E402
from lsp.train.mqar import MQAR  # noqa: E402

PATTERNS = {"L": "all-linear", "LLLLLLLS": "7:1", "LLLS": "3:1", "LS": "1:1", "S": "all-softmax"}


def batch(task: MQAR, start: int, n: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    # -> input_ids [n, T], labels [n, T]
    pairs = [task.sample(i, split) for i in range(start, start + n)]
    return (torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs])))


@torch.no_grad()
def recall_accuracy(model: HybridLM, task: MQAR, n: int, bs: int) -> float:
    """Fraction of queried keys whose value is the argmax of the logits (held-out 'val' samples)."""
    model.eval()
    hit = tot = 0
    for s in range(0, n, bs):
        ids, labels = batch(task, s, min(bs, n - s), "val")
        pred = model(ids).logits.argmax(-1)
        mask = labels != -100
        hit += (pred[mask] == labels[mask]).sum().item()
        tot += mask.sum().item()
    model.train()
    return hit / max(tot, 1)


def matched_config(pattern: str, vocab_size: int, args) -> HybridConfig:
    """The pattern's config with the MLP width (multiple of 8) that brings its parameter count closest to the
    all-linear model's (a GLA layer has D² + low-rank-decay weights more than a softmax layer). args.match_kind
    (optional): the linear kind of that all-linear model, when it is not args.linear_attn; a kind with more mixer
    weights than that target gets a narrower MLP, one with fewer a wider one."""
    def cfg_for(p, inter=None, kind=args.linear_attn):
        return HybridConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                            num_heads=args.heads, layer_pattern=p, linear_attn=kind,
                            intermediate_size=inter)

    base = cfg_for(pattern)
    if not args.match_params:
        return base
    count = lambda c: num_parameters(HybridLM(c))  # noqa: E731
    target = count(cfg_for("L", kind=getattr(args, "match_kind", None) or args.linear_attn))
    step = 8 if count(base) < target else -8
    best = prev = base
    # parameters grow with the MLP width: walk towards the target, stop at the first width past it
    while (count(best) - target) * step < 0 and best.intermediate_size + step > 0:
        prev, best = best, cfg_for(pattern, best.intermediate_size + step)
    return min((prev, best), key=lambda c: abs(count(c) - target))


def train_one(pattern: str, args, seed: int) -> dict:
    torch.manual_seed(seed)
    task = MQAR(DataConfig(seq_len=args.seq_len, mqar=MQARConfig(num_kv_pairs=args.kv_pairs, num_queries=args.queries,
                                                                 num_keys=args.num_keys, num_values=args.num_values)),
                seed=seed)
    cfg = matched_config(pattern, task.vocab_size, args)
    model = HybridLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.98))
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    t0 = time.perf_counter()
    for step in range(args.steps):
        ids, labels = batch(task, step * args.batch, args.batch, "train")
        loss = model(ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    acc = recall_accuracy(model, task, args.eval_samples, args.batch)
    return {"pattern": pattern, "ratio": PATTERNS.get(pattern, pattern), "softmax_layers": cfg.layer_types.count("S"),
            "params": num_parameters(model), "mlp": cfg.intermediate_size, "seed": seed,
            "final_loss": round(loss.item(), 4), "recall_acc": round(acc, 4), "train_s": round(train_s, 1)}


def plot(rows: list[dict], path: str, title: str, chance: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [p for p in PATTERNS if any(r["pattern"] == p for r in rows)]
    x = [next(r["softmax_layers"] for r in rows if r["pattern"] == p) for p in order]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for seed in sorted({r["seed"] for r in rows}):
        ys = [next(r["recall_acc"] for r in rows if r["pattern"] == p and r["seed"] == seed) for p in order]
        ax.plot(x, ys, "o-", label=f"seed {seed}")
    finish_plot(fig, ax, path, title, chance, x, [f"{PATTERNS.get(p, p)}\n({n} S)" for p, n in zip(order, x)])


def finish_plot(fig, ax, path: str, title: str, chance: float, ticks, labels, legend_size: int = 8,
                xlabel: str = "layer pattern (linear:softmax) and number of softmax layers", legend_loc: str = "best"
                ) -> None:
    """Chance line, x ticks, labels, legend; save the PNG (shared by the MQAR studies)."""
    import matplotlib.pyplot as plt

    ax.axhline(chance, color="gray", ls="--", lw=1, label=f"chance (1/{round(1 / chance)})")
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("MQAR recall accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc=legend_loc)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_study_args(p: argparse.ArgumentParser, plot: str) -> None:
    """The task, model, training and output flags the MQAR studies share (defaults: the documented study)."""
    p.add_argument("--seeds", default="0")
    for flag, default in (("--layers", 8), ("--hidden", 64), ("--heads", 2), ("--seq-len", 64), ("--kv-pairs", 8),
                          ("--queries", 8), ("--num-keys", 32), ("--num-values", 32), ("--steps", 400),
                          ("--batch", 32), ("--eval-samples", 256), ("--threads", 1)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--plot", default=plot, help="PNG path ('' = no plot)")
    p.add_argument("--json", default="", help="also write the rows as JSON here")
    p.add_argument("--from-json", default="", help="no training: table and plot from rows saved by --json")


def quick_task(args) -> None:
    # the CI smoke's task: 4 pairs, 4 queries, batches of 4, 8 held-out samples
    args.kv_pairs = args.queries = 4
    args.batch, args.eval_samples = 4, 8


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke: 2 patterns, a few steps")
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--linear-attn", default="gla")
    p.add_argument("--no-match-params", dest="match_params", action="store_false",
                   help="keep the default MLP width (softmax-heavy patterns then have a few %% fewer parameters)")
    add_study_args(p, "docs/img/hybrid_ratio.png")
    args = p.parse_args(argv)
    if args.quick:
        args.patterns, args.steps, args.layers, args.seq_len = "LLLS,S", 3, 4, 32
        quick_task(args)
    torch.set_num_threads(args.threads)
    title = (f"MQAR T={args.seq_len}, {args.kv_pairs} kv pairs, {args.layers} layers d={args.hidden} "
             f"({args.linear_attn}), {args.steps} steps x {args.batch}")
    return run_study(args, lambda: [train_one(pat, args, int(seed)) for seed in args.seeds.split(",")
                                    for pat in args.patterns.split(",")], title, plot)


def run_study(args, train, title: str, plot_rows) -> list[dict]:
    """Rows from train() (or --from-json), then the table, the PNG (plot_rows(rows, path, title, chance)) and
    --json; shared by the MQAR studies."""
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)
    else:
        rows = train()
    print_table(rows, title)
    if args.plot:
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        plot_rows(rows, args.plot, title, 1 / args.num_values)
        print(f"\nplot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
