"""Per-token decoding cost vs. prefix length: recurrent decoding (`HybridLM.generate`) against re-running the prefix.

For each prefix length P: prefill P random tokens, then time `--steps` single-token decode steps (the prefixes
in turn, minimum over `--rounds` rounds) and count their FLOPs (FlopCounterMode). A pure-linear model ("L")
decodes from its d_k x d_v state per head, so time, FLOPs and cache size per token do not depend on P; a hybrid
("LLLS") also reads a KV cache that grows with P; "no cache" runs the whole prefix again for one token, what
generation cost before this path. FLOPs are FlopCounterMode's matmul count (the CPU flash-attention kernel of the
KV-cache query is not counted).

    python benchmarks/generate.py                 # P = 256 and 4096, hidden 256, 4 layers
    python benchmarks/generate.py --quick         # small, for the smoke test
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, print_table, time_fn  # noqa: E402

from lsp.models import HybridConfig, HybridLM  # noqa: E402


def build(pattern: str, hidden: int, layers: int, vocab: int) -> HybridLM:
    cfg = HybridConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64),
                       layer_pattern=pattern, linear_attn="gla")
    return HybridLM(cfg).eval()


def cache_bytes(cache) -> int:
    """Bytes of every tensor a DecodeCache holds (linear states, keys and values)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in vars(layer).values()
               if isinstance(t, torch.Tensor))


def prefilled(model: HybridLM, ids: torch.Tensor):
    cache = model.new_cache()
    model(ids, cache=cache)
    return cache


@torch.no_grad()
def decode_costs(model: HybridLM, prefixes, steps: int, rounds: int) -> list[dict]:
    """Per prefix: ms per decoded token (logits included), its FLOPs, the cache size, and one no-cache step.

    The prefixes are timed in turn, round after round, so that load from other processes slows them alike; the
    minimum over rounds (after one warm-up round) is reported. The prefill is not timed."""
    prompts = {P: torch.randint(0, model.cfg.vocab_size, (1, P)) for P in prefixes}
    best = {P: float("inf") for P in prefixes}
    for r in range(rounds + 1):
        for P, ids in prompts.items():
            cache, token = prefilled(model, ids), ids[:, -1:]
            start = time.perf_counter()
            for _ in range(steps):
                model(token, cache=cache)
            if r:
                best[P] = min(best[P], (time.perf_counter() - start) / steps)
    rows = []
    for P, ids in prompts.items():
        cache = prefilled(model, ids)
        with FlopCounterMode(display=False) as counter:
            model(ids[:, -1:], cache=cache)
        rows.append({"prefix": P, "ms/token": best[P] * 1e3, "MFLOP/token": counter.get_total_flops() / 1e6,
                     "cache KB": cache_bytes(cache) / 1024,
                     "no-cache ms/token": time_fn(lambda: model(ids), warmup=0, repeats=1) * 1e3})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefixes", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--patterns", nargs="+", default=["L", "LLLS"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.prefixes, args.hidden, args.layers, args.steps, args.rounds = [64, 512], 64, 4, 4, 2
    torch.manual_seed(0)
    rows = []
    for pattern in args.patterns:
        model = build(pattern, args.hidden, args.layers, args.vocab)
        costs = decode_costs(model, args.prefixes, args.steps, args.rounds)
        rows += [{"pattern": pattern, **c, "ratio vs first": c["ms/token"] / costs[0]["ms/token"]} for c in costs]
    print_table(rows, f"decode cost per token, {device_name('cpu')}, hidden {args.hidden}, {args.layers} layers, "
                      f"gla, vocab {args.vocab}")
    return rows


if __name__ == "__main__":
    main()
