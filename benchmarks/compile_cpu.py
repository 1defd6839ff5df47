"""torch.compile of the tiny-cpu model on CPU: dynamo's graphs and breaks, then forward + backward eager vs compiled.

    OMP_NUM_THREADS=1 python benchmarks/compile_cpu.py torch                           # the chunked torch path
    TRITON_INTERPRET=1 N=3 OMP_NUM_THREADS=1 python benchmarks/compile_cpu.py triton   # the Triton custom ops

tiny-cpu at sp=1 in fp32 (B = 16, T = 64); timings are the median of N (default 20) interleaved steps. Results:
docs/ops.md (Custom ops, fake tensors and torch.compile).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch._dynamo

from lsp.models import HybridLM
from lsp.run_config import hybrid_config, load_config


def step(model, ids, labels):
    # one forward + backward; returns the loss
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels)
    out.loss.backward()
    return out.loss.detach()


def explain(model, ids, labels) -> None:
    ex = torch._dynamo.explain(model)(ids, labels=labels)
    print(f"dynamo.explain: graphs={ex.graph_count} graph_breaks={ex.graph_break_count} ops={ex.op_count}")
    for r in ex.break_reasons:
        where = f"{r.user_stack[-1].filename}:{r.user_stack[-1].lineno}" if r.user_stack else ""
        print("  break:", str(r.reason)[:300], where)
    torch._dynamo.reset()


def main(backend: str, n: int) -> None:
    cfg = load_config("configs/tiny-cpu.yaml", ["parallel.sp=1", f"model.extra.linear_backend={backend}"],
                      check_files=False)
    mcfg = hybrid_config(cfg, 257)
    torch.manual_seed(0)
    model = HybridLM(mcfg)
    ids = torch.randint(0, 257, (cfg.train.micro_batch, cfg.data.seq_len))
    labels = torch.randint(0, 257, ids.shape)
    print(f"linear backend {mcfg.linear_backend}")
    explain(model, ids, labels)
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    loss_c = step(compiled, ids, labels)
    print(f"first compiled step (compile + run): {time.perf_counter() - t0:.1f} s")
    loss_e = step(model, ids, labels)
    eager_grads = [p.grad.clone() for p in model.parameters()]
    step(compiled, ids, labels)
    diff = max((a - p.grad).abs().max().item() for a, p in zip(eager_grads, model.parameters()))
    print(f"loss eager {loss_e.item():.6f} compiled {loss_c.item():.6f}; max gradient difference {diff:.2e}")
    eager, comp = [], []
    for _ in range(n):
        for fn, times in ((model, eager), (compiled, comp)):
            t0 = time.perf_counter()
            step(fn, ids, labels)
            times.append(time.perf_counter() - t0)
    e, c = statistics.median(eager), statistics.median(comp)
    print(f"fwd+bwd median of {n} (interleaved): eager {e * 1e3:.2f} ms, compiled {c * 1e3:.2f} ms, "
          f"speedup {e / c:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "torch", int(os.environ.get("N", "20")))
