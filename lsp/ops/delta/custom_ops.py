"""The Triton delta-rule op and its chunk scan (the SP path's piece) as torch custom ops (`torch.library.custom_op`).

    lsp::delta_rule(q, k, v, beta, g, initial_state, scale, cu_seqlens)          -> (o, final)
    lsp::delta_chunk_scan(Kd, Wk, U, decay, init, reset, end, n_seq, prec)      -> (entering, final)

each with a backward op (`lsp::*_backward`) and `register_autograd`, as lsp/ops/linear/custom_ops.py does for the
linear-attention kernels: fake and meta tensors and `torch.compile` see single ops with exact output shapes and
dtypes (`register_fake`), and autograd keeps what the Triton path keeps: q, k, v, beta, g and the initial state for
the op (T, U, Wk, Kd and the chunk states are recomputed in backward); Kd, Wk, U, the decay, the entering states and
the two tables for the scan. The math is in `triton_chunk.py` / `triton_scan.py` (launchers unchanged); this module
only registers it. Importing it makes `delta_rule`'s `backend="auto"` measure the Triton path under
`lsp.ops.estimate.gpu_code_paths()` (`register_fake_capable("triton", "delta_rule")`).

Shapes: q, k [B, T, H, K]; v [B, T, HV, V] with HV = G·H value heads (the kernels read q/k head j // G for value
head j, so autograd keeps q and k at H heads); beta [B, T, HV]; g None, [B, T, HV] or [B, T, HV, K] (a gate per key
channel, KDA: its fake and backward shapes are g's, as for a gate per head); initial_state [n, HV, K, V] (n = B, or
N packed sequences); final in the accumulation dtype (fp32, fp64 for fp64).
Scan: Kd, Wk [R, H, NC, C, K]; U [R, H, NC, C, D]; decay None, [R, H, NC] or [R, H, NC, K] (per key channel);
init None or [n_seq, H, K, D]; reset, end int32 [R, NC] (`chunk.scan_tables`). A gradient a backward op does not
produce comes back as an empty tensor and is turned into None here (custom ops return tensors only).
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

from lsp.names import CHUNK_SIZE
from lsp.ops.linear.checks import acc_dtype

from ..estimate import register_fake_capable


def _kernels():
    # the launchers import triton; registration does not, so fake tensors work where triton is absent
    from . import triton_chunk, triton_scan

    return triton_chunk, triton_scan


def _or_empty(x: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if x is None else x


# -- the whole op ----------------------------------------------------------------------------------------------

@torch.library.custom_op("lsp::delta_rule", mutates_args=())
def _op(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Optional[Tensor], initial_state: Optional[Tensor],
        scale: float, cu_seqlens: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    o, final = _kernels()[0].triton_forward(q, k, v, beta, g, scale, initial_state, cu_seqlens)
    return o.contiguous(), final


@_op.register_fake
def _(q, k, v, beta, g, initial_state, scale, cu_seqlens):
    n = k.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (q.new_empty(*v.shape), q.new_empty(n, v.shape[2], k.shape[3], v.shape[3], dtype=acc_dtype(q.dtype)))


@torch.library.custom_op("lsp::delta_rule_backward", mutates_args=())
def _op_bwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Optional[Tensor], initial_state: Optional[Tensor],
            scale: float, cu_seqlens: Optional[Tensor], do: Tensor, dfinal: Tensor) -> list[Tensor]:
    dq, dk, dv, dbeta, dg, dinit = _kernels()[0].triton_backward(q, k, v, beta, g, initial_state, scale, cu_seqlens,
                                                                 do, dfinal)
    dinit = None if dinit is None else dinit.to(initial_state.dtype)
    return [x.contiguous() for x in (dq, dk, dv, dbeta)] + [_or_empty(dg, q), _or_empty(dinit, q)]


@_op_bwd.register_fake
def _(q, k, v, beta, g, initial_state, scale, cu_seqlens, do, dfinal):
    return [torch.empty_like(x) for x in (q, k, v, beta)] + [
        q.new_empty(0) if x is None else torch.empty_like(x) for x in (g, initial_state)]


def _op_setup(ctx, inputs, output):
    q, k, v, beta, g, initial_state, scale, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, beta, g, initial_state)     # what the Triton op keeps: the rest is recomputed
    ctx.scale, ctx.cu_seqlens = scale, cu_seqlens


def _op_backward(ctx, do, dfinal):
    q, k, v, beta, g, initial_state = ctx.saved_tensors
    dq, dk, dv, dbeta, dg, dinit = _op_bwd(q, k, v, beta, g, initial_state, ctx.scale, ctx.cu_seqlens, do, dfinal)
    return dq, dk, dv, dbeta, dg if g is not None else None, dinit if initial_state is not None else None, None, None


_op.register_autograd(_op_backward, setup_context=_op_setup)


# -- the chunk scan ------------------------------------------------------------------------------------------

@torch.library.custom_op("lsp::delta_chunk_scan", mutates_args=())
def _scan(Kd: Tensor, Wk: Tensor, U: Tensor, decay: Optional[Tensor], init: Optional[Tensor], reset: Tensor,
          end: Tensor, n_seq: int, prec: str) -> tuple[Tensor, Tensor]:
    return _kernels()[1].scan_forward(Kd, Wk, U, decay, init, reset, end, n_seq, prec)


@_scan.register_fake
def _(Kd, Wk, U, decay, init, reset, end, n_seq, prec):
    R, H, NC, C, K = Kd.shape
    D = U.shape[-1]
    return U.new_empty(R, H, NC, K, D), U.new_empty(n_seq, H, K, D)


@torch.library.custom_op("lsp::delta_chunk_scan_backward", mutates_args=())
def _scan_bwd(Kd: Tensor, Wk: Tensor, U: Tensor, decay: Optional[Tensor], enter: Tensor, reset: Tensor,
              end: Tensor, d_enter: Tensor, d_final: Tensor, prec: str) -> list[Tensor]:
    dKd, dWk, dU, ddec, dinit = _kernels()[1].scan_grads(Kd, Wk, U, decay, enter, reset, end, d_enter, d_final, prec)
    return [dKd, dWk, dU, _or_empty(ddec, U), dinit]


@_scan_bwd.register_fake
def _(Kd, Wk, U, decay, enter, reset, end, d_enter, d_final, prec):
    ddec = U.new_empty(0) if decay is None else torch.empty_like(decay)
    return [torch.empty_like(Kd), torch.empty_like(Wk), torch.empty_like(U), ddec, torch.empty_like(d_final)]


def _scan_setup(ctx, inputs, output):
    Kd, Wk, U, decay, init, reset, end, n_seq, prec = inputs
    ctx.save_for_backward(Kd, Wk, U, decay, output[0], reset, end)
    ctx.has_init, ctx.prec = init is not None, prec


def _scan_backward(ctx, d_enter, d_final):
    Kd, Wk, U, decay, enter, reset, end = ctx.saved_tensors
    dKd, dWk, dU, ddec, dinit = _scan_bwd(Kd, Wk, U, decay, enter, reset, end, d_enter, d_final, ctx.prec)
    return (dKd, dWk, dU, ddec if decay is not None else None, dinit if ctx.has_init else None,
            None, None, None, None)


_scan.register_autograd(_scan_backward, setup_context=_scan_setup)


# -- the entry points of triton_chunk.py and chunk.py ------------------------------------------------------------

def delta_rule_op(q, k, v, beta, g, initial_state, scale: float, cu_seqlens):
    """(o, final) of the whole op in Triton kernels; see `triton_chunk.triton_delta_rule`."""
    return _op(q, k, v, beta, g, initial_state, scale, cu_seqlens)


def delta_chunk_scan(Kd, Wk, U, decay, init, reset, end, n_seq: int, prec: str):
    """(entering, final) of the chunk scan in one Triton kernel; see `chunk._triton_scan`."""
    return _scan(Kd, Wk, U, decay, init, reset, end, n_seq, prec)


# -- FLOPs: what FlopCounterMode counts for the kernels ---------------------------------------------------------

def delta_chunk_flops(K: int, V: int, C: int = CHUNK_SIZE, key: bool = False) -> dict:
    """Matmul FLOPs (the kernels' tl.dot products, 2 per multiply-add) per chunk of C tokens and head, by launch
    group of `triton_chunk.py`, with s = C / 4 the inverse's sub-block and nV = ceil(V / 64) the output kernels' V
    blocks (each recomputes q kᵀ; lsp.ops.linear.triton_chunk.BLOCK):
        ut      A's 10 sub-block pairs 20·s²·K, the block inverse's 16 products 32·s³, T(beta V), T(beta e^G K)
                2·C²·(K + V)
        scan    W = U − Wk S, Kdᵀ W: 4·C·K·V
        output  q kᵀ 2·C²·K·nV, q S and Wk S 4·C·K·V, P W 2·C²·V
        grads   the five backward kernels once ut and scan are recomputed: 2·C²·K·nV + 12·C²·K + 8·C²·V
                + 20·C·K·V + 4·C³
    The forward op is ut + scan + output; its backward ut + scan + grads. A gate per key channel (`key`, triton_key.py)
    forms the decayed scores Akk and P in the 16-row kernels, 2·C²·K each (a [16, K] x [K, C] dot per sub-block),
    in place of A's sub-block pairs (ut) and the output kernels' q kᵀ (output, and the output's gradient in grads);
    its other backward changes cancel: the 16-row gradients of Akk and P (2 x 4·C²·K) replace the dA kernel's k kᵀ
    and the key kernel's four C²-by-K products (10·C²·K) less P's recomputation (2·C²·K)."""
    s, nV = C // 4, -(-V // 64)
    qk = 2 * C * C * K * nV                                       # the output kernels' q kᵀ (each V block)
    pairs = 2 * C * C * K if key else 20 * s * s * K              # Akk (per key) or A's sub-block pairs
    return {"ut": pairs + 32 * s ** 3 + 2 * C * C * (K + V), "scan": 4 * C * K * V,
            "output": (2 * C * C * K if key else qk) + 4 * C * K * V + 2 * C * C * V,
            "grads": (0 if key else qk) + 12 * C * C * K + 8 * C * C * V + 20 * C * K * V + 4 * C ** 3}


def delta_scan_flops(K: int, D: int, C: int = CHUNK_SIZE) -> tuple[int, int]:
    """(forward, backward) matmul FLOPs per chunk and head of `lsp::delta_chunk_scan` with D state columns: the
    kernel's W = U − Wk S and Kdᵀ W (4·C·K·D); backward, the reverse chain's Kd dS and Wkᵀ dU in the kernel (4·C·K·D)
    and the batched products dU, Wk S, dKd and dWk (8·C·K·D)."""
    return 4 * C * K * D, 12 * C * K * D


def _chunks(v_shape) -> int:
    # padded chunks x value heads of v [B, T, HV, V] (exact without cu_seqlens)
    B, T, H, _ = v_shape
    return B * H * -(-T // CHUNK_SIZE)


_FLOPS_REGISTERED = []


def register_flop_formulas() -> None:
    """Give FlopCounterMode the ops' formulas (once; not at import, as lsp/ops/linear/custom_ops.py explains)."""
    if _FLOPS_REGISTERED:
        return
    from torch.utils.flop_counter import register_flop_formula

    def op(k, v, g, part):
        c = delta_chunk_flops(k[-1], v[-1], key=g is not None and len(g) == 4)
        return _chunks(v) * (c["ut"] + c["scan"] + c[part])

    def scan(Kd, U, i):
        R, H, NC, C, K = Kd
        return R * H * NC * delta_scan_flops(K, U[-1], C)[i]

    formulas = {
        torch.ops.lsp.delta_rule: lambda q, k, v, beta, g, *a, **kw: op(k, v, g, "output"),
        torch.ops.lsp.delta_rule_backward: lambda q, k, v, beta, g, *a, **kw: op(k, v, g, "grads"),
        torch.ops.lsp.delta_chunk_scan: lambda Kd, Wk, U, *a, **kw: scan(Kd, U, 0),
        torch.ops.lsp.delta_chunk_scan_backward: lambda Kd, Wk, U, *a, **kw: scan(Kd, U, 1),
    }
    for name, formula in formulas.items():
        register_flop_formula(name)(formula)
    _FLOPS_REGISTERED.append(True)


if importlib.util.find_spec("triton") is not None:
    register_fake_capable("triton", "delta_rule")
