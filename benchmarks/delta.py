"""Delta-rule op benchmark: chunked WY/UT torch path vs the naive recurrence, forward and forward+backward.

    python benchmarks/delta.py                     # CPU, T = 8192, B=1 H=4 K=V=64, gated and not
    python benchmarks/delta.py --quick             # tiny shapes (smoke test)

`x naive` = naive time / chunked time, measured side by side in one run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table, time_fn  # noqa: E402

from lsp.ops import delta_rule  # noqa: E402


def make(gated, B, T, H, K, V, device, requires_grad):
    # unit-norm keys and beta = sigmoid, as the Gated DeltaNet layer makes them
    q, k = (torch.randn(B, T, H, K, device=device) for _ in range(2))
    x = [q * K**-0.5, F.normalize(k, dim=-1), torch.randn(B, T, H, V, device=device),
         torch.sigmoid(torch.randn(B, T, H, device=device)),
         F.logsigmoid(torch.randn(B, T, H, device=device) + 3) if gated else None]
    return [t.requires_grad_(requires_grad) if t is not None else None for t in x]


def bench(backend, inputs, backward, device, repeats):
    def step():
        o, _ = delta_rule(*inputs, backend=backend)
        if backward:
            o.sum().backward()

    with torch.set_grad_enabled(backward):
        return time_fn(step, device, warmup=1 if backend != "naive" else 0, repeats=repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[8192])
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    Ts, H, K = ([256], 2, 16) if args.quick else (args.T, args.H, args.K)
    rows = []
    for T in Ts:
        for gated in (False, True):
            for backward in (False, True):
                x = make(gated, 1, T, H, K, K, args.device, backward)
                t_chunk = bench("torch", x, backward, args.device, repeats=3)
                t_naive = bench("naive", x, backward, args.device, repeats=1)
                rows.append({"T": T, "gated": gated, "pass": "fwd+bwd" if backward else "fwd",
                             "torch_ms": 1e3 * t_chunk, "naive_ms": 1e3 * t_naive, "x naive": t_naive / t_chunk})
    print_table(rows, f"delta_rule, B=1 H={H} K=V={K}, {device_name(args.device)}")
    return rows


if __name__ == "__main__":
    main()
