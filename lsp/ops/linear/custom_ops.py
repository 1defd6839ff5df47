"""The Triton linear-attention op and its two SP pieces as torch custom ops (`torch.library.custom_op`).

    lsp::linear_attention(q, k, v, g4, initial_state, scale, cu_seqlens)             -> (o, final)
    lsp::chunk_states(k, v, g4, initial_state, cu_seqlens, recompute_h)               -> (h, final)
    lsp::chunk_output(q, k, v, g4, h, scale, cu_seqlens, out_dtype, recompute, init)  -> o

each with a backward op (`lsp::*_backward`) and `register_autograd`, so fake tensors, meta tensors and
`torch.compile` see the kernels as single ops with exact output shapes and dtypes (`register_fake`), and autograd
keeps exactly what the Triton path keeps: q, k, v, g and the initial state for the op (h is recomputed in
backward); for the pieces h, or with recomputation the initial state it came from. The math is in
`triton_chunk.py` (forward and backward launchers, unchanged); this module only registers it. Importing it makes
the estimator's `backend="auto"` measure the Triton path (`lsp.ops.estimate.register_fake_capable("triton")`).

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; g4 None or broadcastable to [B, T, H, K]; initial_state [n, H, K, V]
(n = B, or N packed sequences); h [R, H, NC, K, V] in k's dtype (R = B, or 1 packed; NC chunks of the padded
layout: ceil(T / 64) per row, data-dependent with cu_seqlens). An optional gradient a backward op does not produce
comes back as an empty tensor and is turned into None here (custom ops return tensors only).
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

from lsp.names import CHUNK_SIZE

from ..estimate import register_fake_capable


def _kernels():
    # the launchers import triton; registration does not, so fake tensors work where triton is absent
    from . import triton_chunk

    return triton_chunk


def _states_count(k: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    return k.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def _h_shape(k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor]) -> tuple:
    # [R, H, NC, K, V]: one padded row per batch row, or one row of sequences each padded to whole chunks
    B, T, H, K = k.shape
    if cu_seqlens is None:
        return (B, H, -(-T // CHUNK_SIZE), K, v.shape[-1])
    return (1, H, torch.library.get_ctx().new_dynamic_size(), K, v.shape[-1])


def _or_empty(x: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if x is None else x


def _like_or_empty(x: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if x is None else torch.empty_like(x)


# -- the whole op ----------------------------------------------------------------------------------------------

@torch.library.custom_op("lsp::linear_attention", mutates_args=())
def _op(q: Tensor, k: Tensor, v: Tensor, g4: Optional[Tensor], initial_state: Optional[Tensor], scale: float,
        cu_seqlens: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _kernels().op_forward(q, k, v, g4, initial_state, scale, cu_seqlens)


@_op.register_fake
def _(q, k, v, g4, initial_state, scale, cu_seqlens):
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    return (q.new_empty(*v.shape, dtype=q.dtype),
            q.new_empty(_states_count(k, cu_seqlens), H, K, V, dtype=torch.float32))


@torch.library.custom_op("lsp::linear_attention_backward", mutates_args=())
def _op_bwd(q: Tensor, k: Tensor, v: Tensor, g4: Optional[Tensor], initial_state: Optional[Tensor], scale: float,
            cu_seqlens: Optional[Tensor], do: Optional[Tensor], dfinal: Optional[Tensor],
            need_dg: bool) -> list[Tensor]:
    grads = _kernels().op_backward(q, k, v, g4, initial_state, scale, cu_seqlens, do, dfinal, need_dg)
    return [_or_empty(x, q) for x in grads]


@_op_bwd.register_fake
def _(q, k, v, g4, initial_state, scale, cu_seqlens, do, dfinal, need_dg):
    dq = torch.empty_like(q) if do is not None else q.new_empty(0)
    return [dq, torch.empty_like(k), torch.empty_like(v), _like_or_empty(g4 if need_dg else None, q),
            _like_or_empty(initial_state, q)]


def _op_setup(ctx, inputs, output):
    q, k, v, g4, initial_state, scale, cu_seqlens = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, g4, initial_state)      # what the Triton op keeps: h is recomputed
    ctx.scale, ctx.cu_seqlens = scale, cu_seqlens


def _op_backward(ctx, do, dfinal):
    q, k, v, g4, initial_state = ctx.saved_tensors
    if do is None and dfinal is None:
        return (None,) * 7
    need_dg = g4 is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dg, dinit = _op_bwd(q, k, v, g4, initial_state, ctx.scale, ctx.cu_seqlens, do, dfinal, need_dg)
    return (dq if do is not None else None, dk, dv, dg if need_dg else None,
            dinit if initial_state is not None else None, None, None)


_op.register_autograd(_op_backward, setup_context=_op_setup)


# -- the states piece ------------------------------------------------------------------------------------------

@torch.library.custom_op("lsp::chunk_states", mutates_args=())
def _states(k: Tensor, v: Tensor, g4: Optional[Tensor], initial_state: Optional[Tensor],
            cu_seqlens: Optional[Tensor], recompute_h: bool) -> tuple[Tensor, Tensor]:
    return _kernels().states_forward(k, v, g4, initial_state, cu_seqlens)


@_states.register_fake
def _(k, v, g4, initial_state, cu_seqlens, recompute_h):
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    return (k.new_empty(_h_shape(k, v, cu_seqlens)),
            k.new_empty(_states_count(k, cu_seqlens), H, K, V, dtype=torch.float32))


@torch.library.custom_op("lsp::chunk_states_backward", mutates_args=())
def _states_bwd(k: Tensor, v: Tensor, g4: Optional[Tensor], kept: Optional[Tensor], cu_seqlens: Optional[Tensor],
                recompute_h: bool, dh: Optional[Tensor], dfinal: Optional[Tensor], need_dg: bool,
                init_dtype: Optional[torch.dtype]) -> list[Tensor]:
    grads = _kernels().states_backward(k, v, g4, kept, cu_seqlens, recompute_h, dh, dfinal, need_dg, init_dtype)
    return [_or_empty(x, k) for x in grads]


@_states_bwd.register_fake
def _(k, v, g4, kept, cu_seqlens, recompute_h, dh, dfinal, need_dg, init_dtype):
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    dinit = (k.new_empty(0) if init_dtype is None
             else k.new_empty(_states_count(k, cu_seqlens), H, K, V, dtype=init_dtype))
    return [torch.empty_like(k), torch.empty_like(v), _like_or_empty(g4 if need_dg else None, k), dinit]


def _states_setup(ctx, inputs, output):
    k, v, g4, initial_state, cu_seqlens, recompute_h = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(k, v, g4, initial_state if recompute_h else output[0])
    ctx.cu_seqlens, ctx.recompute_h = cu_seqlens, recompute_h
    ctx.init_dtype = None if initial_state is None else initial_state.dtype


def _states_backward(ctx, dh, dfinal):
    k, v, g4, kept = ctx.saved_tensors
    if dh is None and dfinal is None:
        return (None,) * 6
    need_dg = g4 is not None and ctx.needs_input_grad[2]
    dk, dv, dg, dinit = _states_bwd(k, v, g4, kept, ctx.cu_seqlens, ctx.recompute_h, dh, dfinal, need_dg,
                                    ctx.init_dtype)
    return dk, dv, dg if need_dg else None, dinit if ctx.init_dtype is not None else None, None, None


_states.register_autograd(_states_backward, setup_context=_states_setup)


# -- the output piece ------------------------------------------------------------------------------------------

@torch.library.custom_op("lsp::chunk_output", mutates_args=())
def _output(q: Tensor, k: Tensor, v: Tensor, g4: Optional[Tensor], h: Tensor, scale: float,
            cu_seqlens: Optional[Tensor], out_dtype: torch.dtype, recompute: bool,
            initial_state: Optional[Tensor]) -> Tensor:
    return _kernels().output_forward(q, k, v, g4, h, scale, cu_seqlens, out_dtype)


@_output.register_fake
def _(q, k, v, g4, h, scale, cu_seqlens, out_dtype, recompute, initial_state):
    return q.new_empty(*v.shape, dtype=out_dtype)


@torch.library.custom_op("lsp::chunk_output_backward", mutates_args=())
def _output_bwd(q: Tensor, k: Tensor, v: Tensor, g4: Optional[Tensor], kept: Optional[Tensor], scale: float,
                cu_seqlens: Optional[Tensor], recompute: bool, do: Tensor, need_dg: bool) -> list[Tensor]:
    grads = _kernels().output_backward(q, k, v, g4, kept, scale, cu_seqlens, recompute, do, need_dg)
    return [_or_empty(x, q) for x in grads]


@_output_bwd.register_fake
def _(q, k, v, g4, kept, scale, cu_seqlens, recompute, do, need_dg):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            _like_or_empty(g4 if need_dg else None, q), k.new_empty(_h_shape(k, v, cu_seqlens))]


def _output_setup(ctx, inputs, output):
    q, k, v, g4, h, scale, cu_seqlens, out_dtype, recompute, initial_state = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, g4, initial_state if recompute else h)
    ctx.scale, ctx.cu_seqlens, ctx.recompute = scale, cu_seqlens, recompute


def _output_backward(ctx, do):
    q, k, v, g4, kept = ctx.saved_tensors
    if do is None:
        return (None,) * 10
    need_dg = g4 is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dg, dh = _output_bwd(q, k, v, g4, kept, ctx.scale, ctx.cu_seqlens, ctx.recompute, do, need_dg)
    return dq, dk, dv, dg if need_dg else None, dh, None, None, None, None, None


_output.register_autograd(_output_backward, setup_context=_output_setup)


# -- the entry points of triton_chunk.py -----------------------------------------------------------------------

def linear_attention_op(q, k, v, g4, initial_state, scale: float, cu_seqlens):
    """(o, final) of the whole op; see `triton_chunk.triton_linear_attention`."""
    return _op(q, k, v, g4, initial_state, scale, cu_seqlens)


def chunk_states(k, v, g4, initial_state, cu_seqlens, recompute_h: bool):
    """(h, final); see `triton_chunk.triton_chunk_states`."""
    return _states(k, v, g4, initial_state, cu_seqlens, recompute_h)


def chunk_output(q, k, v, g4, h, scale: float, cu_seqlens, out_dtype, recompute_from):
    """o from the entering states h; see `triton_chunk.triton_chunk_output`."""
    recompute = recompute_from is not None
    return _output(q, k, v, g4, h, scale, cu_seqlens, out_dtype, recompute, recompute_from[0] if recompute else None)


# -- FLOPs: what FlopCounterMode counts for the kernels ---------------------------------------------------------

def chunk_flops(rows: int, T: int, H: int, K: int, V: int) -> dict:
    """Matmul FLOPs (2 per multiply-add) of one forward pass of each piece over rows x T tokens padded to whole
    chunks of C (exact without cu_seqlens): states, kᵀv per chunk, 2·K·V per token; output, the full C x C score
    block q kᵀ (2·C·K per token), its product with v (2·C·V) and q h (2·K·V). A backward pass counts twice its
    forward, plus one states scan wherever h is recomputed (the op always, a piece with recompute)."""
    tokens = rows * H * -(-T // CHUNK_SIZE) * CHUNK_SIZE
    return {"states": 2 * K * V * tokens, "output": (2 * CHUNK_SIZE * (K + V) + 2 * K * V) * tokens}


def _count(k_shape, v_shape) -> dict:
    B, T, H, K = k_shape
    return chunk_flops(B, T, H, K, v_shape[-1])


_FLOPS_REGISTERED = []


def register_flop_formulas() -> None:
    """Give FlopCounterMode the ops' formulas (once). Not done at import: torch.utils.flop_counter imports triton,
    which must not happen before a test sets TRITON_INTERPRET=1 (the interpreter flag is read at triton's import)."""
    if _FLOPS_REGISTERED:
        return
    from torch.utils.flop_counter import register_flop_formula

    def total(c, fwd, bwd, recompute=0):
        return fwd * c["output"] + bwd * c["states"] + recompute * c["states"]

    formulas = {
        torch.ops.lsp.linear_attention: lambda q, k, v, *a, **kw: total(_count(k, v), 1, 1),
        torch.ops.lsp.linear_attention_backward: lambda q, k, v, *a, **kw: total(_count(k, v), 2, 2, 1),
        torch.ops.lsp.chunk_states: lambda k, v, *a, **kw: _count(k, v)["states"],
        torch.ops.lsp.chunk_states_backward:
            lambda k, v, g4, kept, cu, recompute_h, *a, **kw: (2 + recompute_h) * _count(k, v)["states"],
        torch.ops.lsp.chunk_output: lambda q, k, v, *a, **kw: _count(k, v)["output"],
        torch.ops.lsp.chunk_output_backward:
            lambda q, k, v, g4, kept, scale, cu, recompute, *a, **kw: total(_count(k, v), 2, 0, recompute),
    }
    for op, formula in formulas.items():
        register_flop_formula(op)(formula)
    _FLOPS_REGISTERED.append(True)


if importlib.util.find_spec("triton") is not None:
    register_fake_capable("triton")
