"""Delta-rule op benchmark: chunked WY/UT torch path vs the naive recurrence, forward and forward+backward.

    python benchmarks/delta.py                     # CPU, T = 8192, B=1 H=4 K=V=64, gated and not
    python benchmarks/delta.py --gates head key --T 4096 --no-naive --no-sp   # a gate per head vs per key (KDA)
    python benchmarks/delta.py --quick             # tiny shapes (smoke test)

`x naive` = naive time / chunked time, measured side by side in one run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table, time_fn  # noqa: E402

from lsp.ops import delta_rule  # noqa: E402
from lsp.parallel import SPContext, sp_delta_rule  # noqa: E402

GATE_SHAPES = {"none": None, "head": lambda B, T, H, K: (B, T, H), "key": lambda B, T, H, K: (B, T, H, K)}


def make(gate, B, T, H, K, V, device, requires_grad):
    # unit-norm keys and beta = sigmoid, as the Gated DeltaNet layer makes them; gate: "none", "head" (GDN) or
    # "key" (KDA), or a bool (True = "head")
    gate = {True: "head", False: "none"}.get(gate, gate)
    shape = GATE_SHAPES[gate]
    q, k = (torch.randn(B, T, H, K, device=device) for _ in range(2))
    x = [q * K**-0.5, F.normalize(k, dim=-1), torch.randn(B, T, H, V, device=device),
         torch.sigmoid(torch.randn(B, T, H, device=device)),
         None if shape is None else F.logsigmoid(torch.randn(shape(B, T, H, K), device=device) + 3)]
    return [t.requires_grad_(requires_grad) if t is not None else None for t in x]


def bench(backend, inputs, backward, device, repeats):
    def step():
        o, _ = delta_rule(*inputs, backend=backend)
        if backward:
            o.sum().backward()

    with torch.set_grad_enabled(backward):
        return time_fn(step, device, warmup=1 if backend != "naive" else 0, repeats=repeats)


def sp_vs_op(gate, T, H, K, device, rounds):
    """fwd+bwd of sp_delta_rule at W=1 (contiguous and zigzag) and over 2 emulated ranks (the whole sequence in
    this process: the op's work plus the maps and the exchange) against the op: each timed in turn, `rounds`
    times, best of each. CPU time of this process (time.process_time), not wall time: the machine is shared, and
    the CPU time does not count the time other processes hold the cores."""
    x = make(gate, 1, T, H, K, K, device, True)

    def step(fn):
        o, _ = fn(*x)
        o.sum().backward()
    fns = {"op": lambda *a: delta_rule(*a)}
    for layout in ("contiguous", "zigzag"):
        sp = SPContext(emulate=1, layout=layout)
        fns[layout] = lambda *a, sp=sp: sp_delta_rule(*a, sp=sp)
    # 2 emulated ranks in this process do the op's whole work plus the maps and the exchange: the SP overhead
    emu2 = SPContext(emulate=2, layout="zigzag")
    fns["emu2"] = lambda *a: sp_delta_rule(*(None if t is None else emu2.shard(t) for t in a), sp=emu2)
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):  # interleaved, so a load spike on the shared machine hits every variant alike
        for name, fn in fns.items():
            t0 = time.process_time()
            step(fn)
            best[name] = min(best[name], time.process_time() - t0)
    return [{"T": T, "gate": gate, "op_ms": 1e3 * best["op"], "sp_contig_ms": 1e3 * best["contiguous"],
             "sp_zigzag_ms": 1e3 * best["zigzag"], "contig/op": best["contiguous"] / best["op"],
             "zigzag/op": best["zigzag"] / best["op"], "emu W=2 zigzag/op": best["emu2"] / best["op"]}]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[8192])
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--gates", nargs="+", choices=list(GATE_SHAPES), default=["none", "head"],
                   help="gate forms: none (DeltaNet), head (Gated DeltaNet), key (KDA)")
    p.add_argument("--sp-only", action="store_true", help="only the SP-at-W=1 comparison")
    p.add_argument("--no-sp", action="store_true", help="skip the SP-at-W=1 comparison")
    p.add_argument("--no-naive", action="store_true", help="skip the naive recurrence (slow at large T)")
    args = p.parse_args(argv)
    Ts, H, K = ([256], 2, 16) if args.quick else (args.T, args.H, args.K)
    rows = []
    for T in ([] if args.sp_only else Ts):
        for gate in args.gates:
            for backward in (False, True):
                x = make(gate, 1, T, H, K, K, args.device, backward)
                t_chunk = bench("torch", x, backward, args.device, repeats=3)
                row = {"T": T, "gate": gate, "pass": "fwd+bwd" if backward else "fwd", "torch_ms": 1e3 * t_chunk}
                if not args.no_naive:
                    t_naive = bench("naive", x, backward, args.device, repeats=1)
                    row.update({"naive_ms": 1e3 * t_naive, "x naive": t_naive / t_chunk})
                rows.append(row)
    if rows:
        print_table(rows, f"delta_rule, B=1 H={H} K=V={K}, {device_name(args.device)}")
    sp_rows = [] if args.no_sp else [r for T in Ts for gate in args.gates
                                     for r in sp_vs_op(gate, T, H, K, args.device, 2 if args.quick else 7)]
    if sp_rows:
        print_table(sp_rows, "sp_delta_rule at W=1 (allgather) vs the op, fwd+bwd")
    return rows, sp_rows


if __name__ == "__main__":
    main()
