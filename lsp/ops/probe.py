"""The first-use probe that lets `backend="auto"` run the Triton kernels on CUDA.

`auto` picks the Triton kernels of an op (linear attention, the delta rule) on CUDA, but only after they have
passed one check per (op, decay form, device, dtype, key and value head size): on a small random input (one row,
2 heads, CHUNK_SIZE + 16 tokens, so a chunk edge and a partial chunk, from a fixed seed, with an initial state) the
kernels' output, final state and every input gradient must equal the chunked torch path's within

    fp64 1e-6, fp32 1e-2 (TF32 dots on the GPU), bf16 / fp16 5e-2      (relative to each tensor's largest entry)

A wrong kernel is off by O(1), far above these. On a mismatch, or when compiling or running the kernels raises, the
op falls back to the chunked torch path for that case, with one warning line naming the op, the case and the error.
The verdict is kept for the process. Forcing a path skips the probe: `backend="triton"` / `"torch"` on the op,
`model.linear_backend=triton|torch` in a config.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lsp.names import CHUNK_SIZE

from .estimate import gpu_code_paths_active, measured_backend

TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-2, torch.bfloat16: 5e-2, torch.float16: 5e-2}
PROBE_TOKENS = CHUNK_SIZE + 16
PROBE_HEADS = 2


@dataclass(frozen=True)
class KernelCase:
    """What a probe verdict holds for: an op's kernels on one device, dtype, head sizes and decay form."""
    op: str                 # the public op: "linear_attention" | "delta_rule" | "dplr_delta_rule"
    device: str
    dtype: torch.dtype
    key_dim: int
    value_dim: int
    form: str               # decay form: "none", "head", "scalar", "key"


def kernel_case(op: str, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None) -> KernelCase:
    """The case of a call: k [B, T, H, K]; v [B, T, H(V), V]; g None, [H], [B, T, H] or [B, T, H, K]."""
    form = "none" if g is None else {1: "head", 3: "scalar", 4: "key"}[g.dim()]
    return KernelCase(op, str(k.device), k.dtype, k.shape[-1], v.shape[-1], form)


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA, or anywhere under the interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def kernels_by_default(device: torch.device) -> bool:
    """Whether `auto` may run Triton kernels on `device` (subject to the probe): CUDA with triton installed."""
    return device.type == "cuda" and triton_available(device)


def check_backend_name(op: str, backend: str, choices) -> None:
    """One line naming `op`'s backends when `backend` is not one of them."""
    if backend not in choices:
        raise ValueError(f"backend must be one of {tuple(choices)} for {op}, got {backend!r}")


def resolve_kernel_backend(op: str, backend: str, device: torch.device, case: KernelCase | None, choices) -> str:
    """The backend a call of `op` runs on, one of `choices`; raises on an unknown or unavailable name. "auto": under
    `lsp.ops.estimate.gpu_code_paths()` the path a GPU would take (the kernels' custom ops run on fake tensors),
    else the Triton kernels on CUDA once they passed the first-use probe for `case` (`kernel_case` of the call),
    else the chunked torch path."""
    check_backend_name(op, backend, choices)
    if backend == "triton" and not triton_available(device):
        raise ValueError(f"backend='triton' needs a CUDA device or TRITON_INTERPRET=1 (inputs are on {device})")
    if backend != "auto":
        return backend
    if gpu_code_paths_active():
        return measured_backend(op)
    if case is None or not kernels_by_default(device):
        return "torch"
    return probed_backend(case)


_VERDICTS: dict[KernelCase, str] = {}


def probed_backend(case: KernelCase) -> str:
    """"triton" when the op's kernels passed the probe for `case` (run on the first call), else "torch"."""
    if case not in _VERDICTS:
        _VERDICTS[case] = _probe(case)
    return _VERDICTS[case]


def _probe(case: KernelCase) -> str:
    try:
        got, ref = probe_run(case, "triton"), probe_run(case, "torch")
        errors = {n: ((got[n].double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
                  for n, b in ref.items()}
        worst = max(errors, key=errors.get)
        if not errors[worst] <= TOLERANCE[case.dtype]:
            raise ArithmeticError(f"{worst} differs from the chunked torch path by {errors[worst]:.2e} relative "
                                  f"(tolerance {TOLERANCE[case.dtype]:.0e})")
        return "triton"
    except Exception as err:                    # a compile error, a launch failure, or the mismatch above
        first = (str(err).strip().splitlines() or [""])[0][:300]
        warnings.warn(f"lsp: the {case.op} Triton kernels failed their first-use check ({case.device}, "
                      f"{str(case.dtype).removeprefix('torch.')}, K={case.key_dim}, V={case.value_dim}, decay "
                      f"{case.form}): {type(err).__name__}: {first}; using the chunked torch path", RuntimeWarning,
                      stacklevel=3)
        return "torch"


def probe_run(case: KernelCase, backend: str) -> dict[str, torch.Tensor]:
    """Output, final state and input gradients of the op on the probe input, on `backend`."""
    fn, names, make = _INPUTS[case.op]
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    T, H, K, V = PROBE_TOKENS, PROBE_HEADS, case.key_dim, case.value_dim
    acc = torch.promote_types(case.dtype, torch.float32)
    # the first call may come from inside no_grad / inference_mode (generation) or autocast: the probe needs neither
    with torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(device_type=torch.device(case.device).type, enabled=False):
        x = {n: t.to(case.device, case.dtype).requires_grad_() for n, t in make(rnd, T, H, K, V, case.form).items()}
        h0 = rnd(1, H, K, V).to(case.device, acc).requires_grad_()
        o, final = fn()(*(x.get(n) for n in names), initial_state=h0, output_final_state=True, backend=backend)
        w_o, w_s = rnd(*o.shape).to(case.device, acc), rnd(*final.shape).to(case.device, acc)
        loss = (o.to(acc) * w_o).sum() + (final * w_s).sum()
        x["initial_state"] = h0
        grads = torch.autograd.grad(loss, list(x.values()))
        return {"o": o.detach(), "final_state": final.detach(), **{f"d{n}": d for n, d in zip(x, grads)}}


def _linear_inputs(rnd, T, H, K, V, form):
    g_shape = {"none": None, "head": (H,), "scalar": (1, T, H), "key": (1, T, H, K)}[form]
    x = {"q": rnd(1, T, H, K), "k": rnd(1, T, H, K), "v": rnd(1, T, H, V)}
    return x if g_shape is None else {**x, "g": F.logsigmoid(rnd(*g_shape) + 3.0)}


def _delta_inputs(rnd, T, H, K, V, form):
    # the gate of the case's form: one per head ("scalar") or one per key channel ("key", KDA)
    x = {"q": rnd(1, T, H, K), "k": F.normalize(rnd(1, T, H, K), dim=-1), "v": rnd(1, T, H, V),
         "beta": torch.sigmoid(rnd(1, T, H))}
    g_shape = {"none": None, "scalar": (1, T, H), "key": (1, T, H, K)}[form]
    return x if g_shape is None else {**x, "g": F.logsigmoid(rnd(*g_shape) + 3.0)}


def _dplr_inputs(rnd, T, H, K, V, form):
    kappa = F.normalize(rnd(1, T, H, K), dim=-1)
    return {"q": rnd(1, T, H, K), "k": rnd(1, T, H, K), "v": rnd(1, T, H, V), "a": -kappa,
            "b": kappa * torch.sigmoid(rnd(1, T, H, K)), "g": F.logsigmoid(rnd(1, T, H, K) + 3.0)}


def _linear_op():
    from .linear.api import linear_attention

    return linear_attention


def _delta_op():
    from .delta.api import delta_rule

    return delta_rule


def _dplr_op():
    from .dplr.api import dplr_delta_rule

    return dplr_delta_rule


# op -> (the public op, its positional inputs in order, the probe input builder)
_INPUTS = {"linear_attention": (_linear_op, ("q", "k", "v", "g"), _linear_inputs),
           "delta_rule": (_delta_op, ("q", "k", "v", "beta", "g"), _delta_inputs),
           "dplr_delta_rule": (_dplr_op, ("q", "k", "v", "a", "b", "g"), _dplr_inputs)}

__all__ = ["KernelCase", "kernel_case", "kernels_by_default", "probed_backend", "probe_run", "TOLERANCE"]
