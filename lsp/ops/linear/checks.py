"""Argument checking and normalisation shared by every linear-attention backend.

User-facing mistakes raise one `ValueError` that names the argument and the expected shape.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lsp.ops.boundaries import boundaries

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class DecayForm:
    """Which of the four decay parameterisations `g` uses."""

    name: str  # "none" | "head" ([H]) | "scalar" ([B, T, H]) | "key" ([B, T, H, K])


def exact_numerics(x: torch.Tensor):
    """A context that switches autocast off around an op's math, so its numerics do not depend on an enclosing
    `torch.autocast`: the state math runs in fp32 (fp64 for fp64 inputs) and the inputs' dtype decides the rest."""
    if not torch.amp.is_autocast_available(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs (so references can be tight), fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_linear_inputs(q, k, v, g, initial_state, cu_seqlens) -> DecayForm:
    """Validate the arguments of `linear_attention` and return the decay form."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, T, H, {'V' if name == 'v' else 'K'}], got {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)} ([B, T, H, K]), got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"head dims must be <= {MAX_HEAD_DIM}, got K={K} (q, k) and V={V} (v)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all inputs must share one device")

    form = DecayForm("none")
    if g is not None:
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            raise ValueError("g (log-decay) must be a floating torch.Tensor or None")
        if g.device != q.device:
            raise ValueError(f"g is on {g.device} but q is on {q.device}")
        if g.shape == (H,):
            form = DecayForm("head")
        elif g.shape == (B, T, H):
            form = DecayForm("scalar")
        elif g.shape == (B, T, H, K):
            form = DecayForm("key")
        else:
            raise ValueError(
                f"g must have shape [H]=[{H}], [B, T, H]=[{B}, {T}, {H}] or [B, T, H, K]=[{B}, {T}, {H}, {K}], "
                f"got {tuple(g.shape)}"
            )

    n_seq = B
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (
            torch.int32,
            torch.int64,
        ):
            raise ValueError("cu_seqlens must be a 1-D int32 tensor [N + 1] of cumulative sequence lengths")
        if B != 1:
            raise ValueError(f"cu_seqlens requires B == 1 (packed sequences), got B={B}")
        bounds = boundaries(cu_seqlens).host   # the loader's host copy: no read back from the device
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds)):
            raise ValueError(f"cu_seqlens must rise from 0 to T={T} without decreasing, got {bounds}")
        n_seq = len(bounds) - 1
    if initial_state is not None:
        want = (n_seq, H, K, V)
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state)
            raise ValueError(f"initial_state must have shape [{'N' if cu_seqlens is not None else 'B'}, H, K, V]="
                             f"{list(want)}, got {got}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    return form


def broadcast_decay(g: torch.Tensor | None, form: DecayForm) -> torch.Tensor | None:
    """View g so it broadcasts against [B, T, H, K]: [H] -> [1, 1, H, 1], [B, T, H] -> [B, T, H, 1]."""
    if g is None:
        return None
    if form.name == "head":
        return g.view(1, 1, -1, 1)
    if form.name == "scalar":
        return g.unsqueeze(-1)
    return g


def seq_bounds(cu_seqlens: torch.Tensor | None, B: int, T: int) -> list[tuple[int, int]] | None:
    """Host-side list of (start, end) per packed sequence, or None when there is no packing."""
    if cu_seqlens is None:
        return None
    return boundaries(cu_seqlens).pairs
