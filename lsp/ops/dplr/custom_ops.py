"""The Triton DPLR op as a torch custom op (`torch.library.custom_op`), as lsp/ops/delta/custom_ops.py does:

    lsp::dplr_delta_rule(q, k, v, a, b, g, initial_state, scale, cu_seqlens)          -> (o, final)
    lsp::dplr_delta_rule_backward(..., do, dfinal)                                     -> gradients

with `register_fake` (fake and meta tensors and `torch.compile` see one op with exact output shapes and dtypes) and
`register_autograd`, whose context keeps only the inputs (q, k, v, a, b, g, the initial state): the scores, the WY
quantities and the chunk states are recomputed in backward. The math is in `triton_chunk.py`.

Shapes: q, k, a, b, g [B, T, H, K]; v [B, T, H, V]; initial_state [n, H, K, V] (n = B, or N packed sequences);
final in fp32. A gradient the backward op does not produce (no initial state) comes back as an empty tensor and is
turned into None here (custom ops return tensors only).
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


@torch.library.custom_op("lsp::dplr_delta_rule", mutates_args=())
def _op(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, g: Tensor, initial_state: Optional[Tensor],
        scale: float, cu_seqlens: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    o, final = _kernels().triton_forward(q, k, v, a, b, g, scale, initial_state, cu_seqlens)
    return o.contiguous(), final


@_op.register_fake
def _(q, k, v, a, b, g, initial_state, scale, cu_seqlens):
    n = k.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return q.new_empty(*v.shape), q.new_empty(n, k.shape[2], k.shape[3], v.shape[3], dtype=torch.float32)


@torch.library.custom_op("lsp::dplr_delta_rule_backward", mutates_args=())
def _op_bwd(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, g: Tensor, initial_state: Optional[Tensor],
            scale: float, cu_seqlens: Optional[Tensor], do: Tensor, dfinal: Tensor) -> list[Tensor]:
    *grads, dinit = _kernels().triton_backward(q, k, v, a, b, g, initial_state, scale, cu_seqlens, do, dfinal)
    dinit = q.new_empty(0) if dinit is None else dinit.to(initial_state.dtype)
    return [x.contiguous() for x in grads] + [dinit]


@_op_bwd.register_fake
def _(q, k, v, a, b, g, initial_state, scale, cu_seqlens, do, dfinal):
    return [torch.empty_like(x) for x in (q, k, v, a, b, g)] + [
        q.new_empty(0) if initial_state is None else torch.empty_like(initial_state)]


def _op_setup(ctx, inputs, output):
    q, k, v, a, b, g, initial_state, scale, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, a, b, g, initial_state)      # the rest is recomputed
    ctx.scale, ctx.cu_seqlens = scale, cu_seqlens


def _op_backward(ctx, do, dfinal):
    q, k, v, a, b, g, initial_state = ctx.saved_tensors
    *grads, dinit = _op_bwd(q, k, v, a, b, g, initial_state, ctx.scale, ctx.cu_seqlens, do, dfinal)
    return (*grads, dinit if initial_state is not None else None, None, None)


_op.register_autograd(_op_backward, setup_context=_op_setup)


def dplr_delta_rule_op(q, k, v, a, b, g, initial_state, scale: float, cu_seqlens):
    """(o, final) of the whole op in Triton kernels; see `triton_chunk.triton_dplr_delta_rule`."""
    return _op(q, k, v, a, b, g, initial_state, scale, cu_seqlens)


# -- FLOPs: what FlopCounterMode counts for the kernels ---------------------------------------------------------

def dplr_chunk_flops(K: int, V: int, C: int = CHUNK_SIZE) -> dict:
    """Matmul FLOPs (the kernels' tl.dot products, 2 per multiply-add) per chunk of C tokens and head, by launch
    group of `triton_chunk.py`, with s = 16 the inverse's sub-block:
        scores    four per-key score matrices, C columns per 16-row sub-block: 8·C²·K
        wy        the block inverse's 16 products 32·s³; A_ak V, T (A_ak V), T (a ⊙ e^G⁻): 4·C²·V + 2·C²·K
        scan      two half-steps of C rows: U − Wk S, Kdᵀ (..): 8·C·K·V
        output    (q ⊙ e^G) E, Wk0 E, P_qb u, P_qk V: 4·C·K·V + 4·C²·V
        grads     output backward (three kernels) 10·C·K·V + 8·C²·V; the scan's middle states 4·C·K·V, its
                  reverse chain and four batched products 24·C·K·V; WY backward 6·C²·V + 4·C²·K + 8·C³; the
                  scores' backward 16·C²·K
    The forward op is scores + wy + scan + output; its backward scores + wy + scan + grads (recomputed forward)."""
    s = 16
    return {"scores": 8 * C * C * K, "wy": 32 * s ** 3 + 4 * C * C * V + 2 * C * C * K, "scan": 8 * C * K * V,
            "output": 4 * C * K * V + 4 * C * C * V,
            "grads": 38 * C * K * V + 14 * C * C * V + 20 * C * C * K + 8 * C ** 3}


_FLOPS_REGISTERED = []


def register_flop_formulas() -> None:
    """Give FlopCounterMode the op's formulas (once; as lsp/ops/delta/custom_ops.py does)."""
    if _FLOPS_REGISTERED:
        return
    from torch.utils.flop_counter import register_flop_formula

    def op(k, v, part):
        B, T, H, K = k
        c = dplr_chunk_flops(K, v[-1])
        return B * H * -(-T // CHUNK_SIZE) * (c["scores"] + c["wy"] + c["scan"] + c[part])

    register_flop_formula(torch.ops.lsp.dplr_delta_rule)(lambda q, k, v, *a, **kw: op(k, v, "output"))
    register_flop_formula(torch.ops.lsp.dplr_delta_rule_backward)(lambda q, k, v, *a, **kw: op(k, v, "grads"))
    _FLOPS_REGISTERED.append(True)


if importlib.util.find_spec("triton") is not None:
    register_fake_capable("triton", "dplr_delta_rule")
