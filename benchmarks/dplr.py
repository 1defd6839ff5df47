"""What the general DPLR rule costs against the specialised ops it contains: FLOPs (torch's FlopCounterMode: matmul,
einsum and triangular-solve FLOPs; elementwise work is not counted) and wall time on this machine, forward and
forward+backward, measured side by side on one shape.

    python benchmarks/dplr.py                     # B=1 T=1024 H=4 K=V=64
    python benchmarks/dplr.py --quick             # tiny shapes (smoke test)
    python benchmarks/dplr.py --kernel-flops      # the Triton kernel paths' matmul FLOPs (no GPU needed)

Rows: dplr_delta_rule (a, b, per-key g), the same with b = 0 (GLA), linear_attention with per-key g (GLA's own
chunked path), delta_rule with a scalar gate (Gated DeltaNet's chunked path); every one on backend="torch".
--kernel-flops counts the same calls on their Triton kernels instead: fake tensors under
`lsp.ops.estimate.gpu_code_paths()` (what `lsp plan --measure` runs), each custom op counted by its registered
formula (the FLOPs of the kernels' tl.dot products); no time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_fn  # noqa: E402

from lsp.ops import delta_rule, dplr_delta_rule, linear_attention  # noqa: E402


def make(B, T, H, K, V):
    # RWKV-7-like DPLR inputs: a = -κ̂, b = κ̂ ⊙ α; the other ops reuse q, k, v, g (and β, a scalar gate)
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    kappa = F.normalize(torch.randn(B, T, H, K), dim=-1)
    g = F.logsigmoid(torch.randn(B, T, H, K) + 3)
    return {"q": q, "k": k, "v": v, "a": -kappa, "b": kappa * torch.rand(B, T, H, K), "g": g,
            "beta": torch.sigmoid(torch.randn(B, T, H)), "g_scalar": g.mean(-1), "k_unit": F.normalize(k, dim=-1)}


def ops(x, backend="torch"):
    return {
        "dplr_delta_rule": lambda: dplr_delta_rule(x["q"], x["k"], x["v"], x["a"], x["b"], x["g"], backend=backend),
        "dplr_delta_rule, b = 0": lambda: dplr_delta_rule(x["q"], x["k"], x["v"], x["a"], torch.zeros_like(x["b"]),
                                                          x["g"], backend=backend),
        "linear_attention, g [B,T,H,K]": lambda: linear_attention(x["q"], x["k"], x["v"], x["g"], backend=backend),
        "delta_rule, g [B,T,H]": lambda: delta_rule(x["q"], x["k_unit"], x["v"], x["beta"], x["g_scalar"],
                                                    backend=backend),
    }


def measure(fn, x, backward, repeats):
    # (GFLOP, ms) of one call (forward, or forward + backward of o.sum())
    def step():
        for t in x.values():
            t.grad = None
        o, _ = fn()
        if backward:
            o.sum().backward()

    for t in x.values():
        t.requires_grad_(backward)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9, time_fn(step, repeats=repeats) * 1e3


def kernel_flops(B, T, H, K, V):
    # GFLOP of the Triton kernel paths (forward, forward + backward) by their registered formulas, on fake tensors
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lsp.ops.delta.custom_ops import register_flop_formulas as delta_formulas
    from lsp.ops.dplr.custom_ops import register_flop_formulas as dplr_formulas
    from lsp.ops.estimate import gpu_code_paths
    from lsp.ops.linear.custom_ops import register_flop_formulas as linear_formulas

    for register in (linear_formulas, delta_formulas, dplr_formulas):
        register()
    rows = []
    with FakeTensorMode(), gpu_code_paths():
        x = make(B, T, H, K, V)
        for name, fn in ops(x, backend="auto").items():          # auto: the kernels' custom ops here
            gf = [measure_flops(fn, x, backward) for backward in (False, True)]
            rows.append({"op": name, "fwd GFLOP": round(gf[0], 3), "fwd+bwd GFLOP": round(gf[1], 3)})
    print_table(rows, f"Triton kernel paths (formulas), B={B} T={T} H={H} K={K} V={V}")


def measure_flops(fn, x, backward):
    for t in x.values():
        t.grad = None
        t.requires_grad_(backward)
    with FlopCounterMode(display=False) as counter:
        o, _ = fn()
        if backward:
            o.sum().backward()
    return counter.get_total_flops() / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--kernel-flops", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    B, T, H, K, V = (1, 128, 2, 16, 16) if args.quick else (1, 1024, 4, 64, 64)
    if args.kernel_flops:
        return kernel_flops(B, T, H, K, V)
    x = make(B, T, H, K, V)
    rows = []
    for name, fn in ops(x).items():
        f_gf, f_ms = measure(fn, x, False, args.repeats)
        b_gf, b_ms = measure(fn, x, True, args.repeats)
        rows.append({"op": name, "fwd GFLOP": round(f_gf, 3), "fwd ms": round(f_ms, 1),
                     "fwd+bwd GFLOP": round(b_gf, 3), "fwd+bwd ms": round(b_ms, 1)})
    print_table(rows, f"CPU, fp32, B={B} T={T} H={H} K={K} V={V}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
