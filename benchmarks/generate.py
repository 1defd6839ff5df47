"""Per-token decoding cost vs. prefix length: recurrent decoding (`HybridLM.generate`) against re-running the prefix.

For each prefix length P: prefill P random tokens once, then time `--steps` single-token decode steps (median per
token over `--repeats` runs) and count their FLOPs (FlopCounterMode). A pure-linear model ("L") decodes from its
d_k x d_v state per head, so time, FLOPs and cache size per token do not depend on P; a hybrid ("LLLS") also reads a KV
cache that grows with P; "no cache" runs the whole prefix again for one token, what generation cost before this
path. FLOPs are FlopCounterMode's matmul count (the CPU flash-attention kernel of the KV-cache query is not counted).

    python benchmarks/generate.py                 # P = 256 and 4096, hidden 256, 4 layers
    python benchmarks/generate.py --quick         # small, for the smoke test
"""
from __future__ import annotations

import argparse
import os
import sys

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


@torch.no_grad()
def decode_cost(model: HybridLM, prefix: int, steps: int, repeats: int) -> dict:
    """ms and FLOPs per decoded token (logits included) after a prefix of `prefix` tokens, and one no-cache step."""
    ids = torch.randint(0, model.cfg.vocab_size, (1, prefix))
    token = ids[:, -1:]
    caches = []
    for _ in range(repeats + 3):   # one prefilled cache per timed run (+ warmup, FLOP count, size); not timed
        caches.append(model.new_cache())
        model(ids, cache=caches[-1])

    def decode():
        cache = caches.pop()
        for _ in range(steps):
            model(token, cache=cache)

    per_token = time_fn(decode, warmup=1, repeats=repeats) / steps
    with FlopCounterMode(display=False) as counter:
        model(token, cache=caches.pop())
    no_cache = time_fn(lambda: model(ids), warmup=0, repeats=1)
    return {"ms/token": per_token * 1e3, "MFLOP/token": counter.get_total_flops() / 1e6,
            "cache KB": cache_bytes(caches[-1]) / 1024, "no-cache ms/token": no_cache * 1e3}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefixes", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--patterns", nargs="+", default=["L", "LLLS"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.prefixes, args.hidden, args.layers, args.steps, args.repeats = [64, 512], 64, 4, 4, 2
    torch.manual_seed(0)
    rows = []
    for pattern in args.patterns:
        model = build(pattern, args.hidden, args.layers, args.vocab)
        for prefix in args.prefixes:
            rows.append({"pattern": pattern, "prefix": prefix, **decode_cost(model, prefix, args.steps, args.repeats)})
        first, last = rows[-len(args.prefixes)], rows[-1]
        last["ratio vs first"] = last["ms/token"] / first["ms/token"]
        first["ratio vs first"] = 1.0
    print_table(rows, f"decode cost per token, {device_name('cpu')}, hidden {args.hidden}, {args.layers} layers, "
                      f"gla, vocab {args.vocab}")
    return rows


if __name__ == "__main__":
    main()
