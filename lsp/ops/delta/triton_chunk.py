r"""The delta rule with backend="triton": the whole chunked forward in Triton kernels, backward by recomputation.

Forward, per batch (the math of `chunk.py`; kernels in `triton_intra.py` and `triton_scan.py`), launches
independent of T:

    T = (I + A)^-1                       `_ut_inverse_kernel`   one program per chunk
    U, Wk, Kd                            `_ut_apply_kernel`     one program per chunk
    S_c (entering states), final states  `_scan_fwd`            one program per (row, head, V block)
    o                                    `_out_kernel`          one program per (chunk, V block)

Backward: only the inputs are saved (q, k, v, beta, g, the initial state: 1x their bytes); the chunked torch path
(its scan in Triton) is recomputed from them and differentiated by autograd.
"""
from __future__ import annotations

import torch
import triton

from lsp.names import CHUNK_SIZE
from lsp.ops.linear.checks import acc_dtype, seq_bounds
from lsp.ops.linear.layout import make_layout
from lsp.ops.linear.triton_chunk import SUB_BLOCK, _block, _precision

from . import chunk as chunk_mod
from .triton_intra import _out_kernel, _ut_apply_kernel, _ut_inverse_kernel

WARPS = 8           # [64, 64] fp32 tiles: with 4 warps the apply and output kernels spill (436, 848 B, sm_90a)


def _chunked(x: torch.Tensor, layout) -> torch.Tensor:
    # [B, T, H, D] -> contiguous [R, H, NC, C, D], zero padded (the kernels' layout)
    return chunk_mod._to_chunks(x, layout).contiguous()


def ut_transform(kc, vc, bc, gc):
    """Tinv [R, H, NC, C, C], U [.., C, V], Wk, Kd [.., C, K] (accumulation dtype) from chunked inputs.

    kc: [R, H, NC, C, K]; vc: [R, H, NC, C, V]; bc, gc: [R, H, NC, C] (gc None without decay).
    """
    R, H, NC, C, K = kc.shape
    V = vc.shape[-1]
    dt = acc_dtype(kc.dtype)
    assert C == 4 * SUB_BLOCK, f"the Triton UT transform works on chunks of {4 * SUB_BLOCK} tokens, got {C}"
    g_arg = gc if gc is not None else bc
    Tinv = kc.new_empty(R, H, NC, C, C, dtype=dt)
    _ut_inverse_kernel[(NC, R * H)](kc, bc, g_arg, Tinv, K, C=C, BS=SUB_BLOCK, BK=_block(K), HAS_G=gc is not None,
                                    num_warps=WARPS)
    U = kc.new_empty(R, H, NC, C, V, dtype=dt)
    Wk, Kd = (kc.new_empty(R, H, NC, C, K, dtype=dt) for _ in range(2))
    _ut_apply_kernel[(NC, R * H)](kc, vc, bc, g_arg, Tinv, U, Wk, Kd, K, V, C=C, BD=_block(max(K, V)),
                                  HAS_G=gc is not None, PREC=_precision(kc.dtype), num_warps=WARPS)
    return Tinv, U, Wk, Kd


def output(qc, kc, gc, U, Wk, entering, scale: float, out_dtype) -> torch.Tensor:
    """o [R, H, NC, C, V] in out_dtype from chunked q, k, g, the UT quantities and the entering states."""
    R, H, NC, C, K = qc.shape
    V = U.shape[-1]
    BV = _block(V)
    o = U.new_empty(R, H, NC, C, V, dtype=out_dtype)
    _out_kernel[(triton.cdiv(V, BV), NC, R * H)](qc, kc, gc if gc is not None else U, U, Wk, entering, o, scale, K, V,
                                                 C=C, BK=_block(K), BV=BV, HAS_G=gc is not None,
                                                 PREC=_precision(qc.dtype), num_warps=WARPS)
    return o


def triton_forward(q, k, v, beta, g, scale, initial_state, cu_seqlens):
    """(o [B, T, H, V] in q's dtype, final [B or N, H, K, V]); arguments as `lsp.ops.delta_rule`."""
    B, T, H, K = k.shape
    dt = acc_dtype(k.dtype)
    layout = make_layout(B, T, seq_bounds(cu_seqlens, B, T), CHUNK_SIZE, k.device)
    qc, kc, vc = (_chunked(x, layout) for x in (q, k.to(q.dtype), v.to(q.dtype)))
    bc = _chunked(beta.to(dt).unsqueeze(-1), layout).squeeze(-1)
    gc = None if g is None else _chunked(g.to(dt).unsqueeze(-1), layout).squeeze(-1)
    _, U, Wk, Kd = ut_transform(kc, vc, bc, gc)
    decay = None if gc is None else gc.sum(-1).exp()                          # [R, H, NC] exp(G_C)
    chunks = chunk_mod.DeltaChunks(layout, kc, None, Kd, Wk, U, decay, "triton", k.dtype)
    init = None if initial_state is None else initial_state.to(dt)
    entering, final = chunk_mod._triton_scan(chunks, U, init)
    o = output(qc, kc, gc, U, Wk, entering.contiguous(), scale, q.dtype)
    return chunk_mod._from_chunks(o, layout), final


class TritonDeltaRule(torch.autograd.Function):
    """(o, final) = the delta rule; forward in kernels, backward by recomputing the chunked path (inputs saved)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale, cu_seqlens):
        ctx.save_for_backward(q, k, v, beta, g, initial_state, cu_seqlens)
        ctx.scale = scale
        return triton_forward(q, k, v, beta, g, scale, initial_state, cu_seqlens)

    @staticmethod
    def backward(ctx, d_o, d_final):
        q, k, v, beta, g, init, cu = ctx.saved_tensors
        xs = [None if x is None else x.detach().requires_grad_(need)
              for x, need in zip((q, k, v, beta, g, init), ctx.needs_input_grad)]
        with torch.enable_grad():
            o, final = chunk_mod.chunk_forward(*xs[:5], ctx.scale, xs[5], True, cu, scan_backend="triton")
        wanted = [x for x in xs if x is not None and x.requires_grad]
        grads = iter(torch.autograd.grad((o, final), wanted, (d_o, d_final), allow_unused=True))
        return (*(next(grads) if x is not None and x.requires_grad else None for x in xs), None, None)


def triton_delta_rule(q, k, v, beta, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """`lsp.ops.delta_rule` with backend="triton" (arguments already validated)."""
    o, final = TritonDeltaRule.apply(q, k, v, beta, g, initial_state, scale, cu_seqlens)
    return o, (final if output_final_state else None)
