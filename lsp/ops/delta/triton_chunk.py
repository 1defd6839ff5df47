r"""The delta rule with backend="triton": the chunked algorithm of `chunk.py` in Triton kernels, forward and backward.

Forward (kernels in `triton_intra.py` and `triton_scan.py`), launches independent of T:

    T = (I + A)^-1                       `_ut_inverse_kernel`   one program per chunk
    U, Wk, Kd                            `_ut_apply_kernel`     one program per chunk
    S_c (entering states), final states  `_scan_fwd`            one program per (row, head, V block)
    o                                    `_out_kernel`          one program per (chunk, V block)

Backward: only the inputs are saved (q, k, v, beta, g, the initial state); T, U, Wk, Kd and S_c are recomputed
(3 launches), then, with W = U − Wk S_c and dS the gradient of the state after a chunk:

    dUo = scale Pᵀ dO,  dE = scale (q e^G)ᵀ dO − Wkᵀ dUo        `_bwd_out_kernel`  (the output's direct gradients)
    dS (every chunk), dinit                                     `_scan_bwd`        (the reverse chain)
    dW = dUo + Kd dS,  dv = beta ⊙ Tᵀ dW,  dbeta (value part)    `_bwd_w_kernel`
    dT = dW (beta V)ᵀ − dW S_cᵀ (beta e^G K)ᵀ,  dA = −Tᵀ dT Tᵀ     `_bwd_dA_kernel`
    dq, dk, dbeta, dG (dg = the reverse cumulative sum of dG)   `_bwd_k_kernel`

A gate per key channel (KDA, triton_key.py) adds the decayed scores Akk (before the inverse) and P (before the
output kernels), formed by the linear op's 16-row kernel, forward and again in backward; its backward runs
`_bwd_k_key_kernel` in place of `_bwd_k_kernel` and then the 16-row gradient kernel for P and for Akk: 6 launches
forward, 12 backward.
"""
from __future__ import annotations

import torch
import triton

from lsp.names import CHUNK_SIZE
from lsp.ops.linear import triton_tune as tune
from lsp.ops.linear.checks import acc_dtype
from lsp.ops.linear.layout import chunk_layout
from lsp.ops.linear.triton_chunk import SUB_BLOCK, _block, _precision

from . import chunk as chunk_mod
from .triton_intra import (
    _bwd_dA_kernel,
    _bwd_k_kernel,
    _bwd_out_kernel,
    _bwd_w_kernel,
    _out_kernel,
    _ut_apply_kernel,
    _ut_inverse_kernel,
)
from .triton_key import _bwd_k_key_kernel, key_intra_grads, key_scores
from .triton_scan import precision, scan_backward

WARPS = 8           # [64, 64] fp32 tiles: with 4 warps the apply and output kernels spill (436, 848 B, sm_90a)
# the three per-chunk backward kernels (W, dA, keys): K and V blocks of 32, one stage; with blocks of 64 or 2 stages
# they spill on sm_90a (bf16: 824 / 48 / 720 B per thread at 64, 1 stage; 0 at 32, 1 stage: 248 / 204 / 248 regs)
BWD_BLOCK = 32
BWD_STAGES = 1
# ... and on sm_80 (A100) the W and dA kernels spill 8 / 68 B at V blocks of 32: their V block is 16 (220 / 255
# registers on sm_80, 170 / 152 on sm_90a, no spill; TRITON_INTERPRET=1 python sm90_report.py --op delta --arch 80)
BWD_V_BLOCK = 16
# the output kernel's K / V blocks go through the tuner (lsp/ops/linear/triton_tune.py; it writes o whole): the
# default must not spill on sm_80 (64 x 64 spills 844 B there, 64 x 32 200 B; 16 x 32: 236 registers, none, and
# 140 on sm_90a); the 64-blocks stay candidates that a GPU keeps where they compile without spills
OUT_CANDIDATES = {"delta_out_kernel": [dict(BK=16, BV=32, num_warps=WARPS, num_stages=3),
                                       dict(BK=64, BV=64, num_warps=WARPS, num_stages=3),
                                       dict(BK=64, BV=32, num_warps=WARPS, num_stages=3),
                                       dict(BK=32, BV=16, num_warps=WARPS, num_stages=3)]}
OUT_TUNER = tune.Tuner(OUT_CANDIDATES)


def _chunked(x: torch.Tensor, layout) -> torch.Tensor:
    # [B, T, H, D] -> contiguous [R, H, NC, C, D], zero padded (the kernels' layout)
    return chunk_mod.to_chunks(x, layout).contiguous()


def _per_key(gc) -> bool:
    # the chunked gate: None, [R, H, NC, C] per head (log-decay per token) or [R, H, NC, C, K] per key (cumulative)
    return gc is not None and gc.dim() == 5


def _groups(qk_chunks: torch.Tensor, per_value_head: torch.Tensor) -> int:
    # G = HV // H: value heads per q/k head (the kernels read q/k head j // G for value head j)
    return per_value_head.shape[1] // qk_chunks.shape[1]


def _per_value_head(x: torch.Tensor, groups: int) -> torch.Tensor:
    # [R, H, NC, C, K] -> [R, G·H, ...], for the linear op's 16-row kernels, which take q, k per value head
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def ut_transform(kc, vc, bc, gc, Akk=None):
    """Tinv [R, HV, NC, C, C], U [.., C, V], Wk, Kd [.., C, K] (accumulation dtype) from chunked inputs.

    kc: [R, H, NC, C, K] (H = HV / G q/k heads); vc: [R, HV, NC, C, V]; bc: [R, HV, NC, C]; gc: None, [R, HV, NC, C]
    (a log-decay per head) or [R, HV, NC, C, K] (per key channel: the within-chunk cumulative log-decay, with Akk =
    key_scores of the keys per value head).
    """
    R, HV, NC, C = bc.shape
    K, V = kc.shape[-1], vc.shape[-1]
    dt = acc_dtype(kc.dtype)
    assert C == 4 * SUB_BLOCK, f"the Triton UT transform works on chunks of {4 * SUB_BLOCK} tokens, got {C}"
    key = _per_key(gc)
    assert not key or Akk is not None, "a gate per key needs its key scores Akk (triton_key.key_scores)"
    g_arg, groups = gc if gc is not None else bc, _groups(kc, bc)
    Tinv = kc.new_empty(R, HV, NC, C, C, dtype=dt)
    _ut_inverse_kernel[(NC, R * HV)](kc, bc, g_arg, Akk if key else bc, Tinv, K, C=C, GROUPS=groups, BS=SUB_BLOCK,
                                     BK=_block(K), HAS_G=gc is not None, KEY=key, num_warps=WARPS)
    U = kc.new_empty(R, HV, NC, C, V, dtype=dt)
    Wk, Kd = (kc.new_empty(R, HV, NC, C, K, dtype=dt) for _ in range(2))
    _ut_apply_kernel[(NC, R * HV)](kc, vc, bc, g_arg, Tinv, U, Wk, Kd, K, V, C=C, GROUPS=groups, BD=_block(max(K, V)),
                                   HAS_G=gc is not None, KEY=key, PREC=_precision(kc.dtype), num_warps=WARPS)
    return Tinv, U, Wk, Kd


def output(qc, kc, gc, U, Wk, entering, scale: float, out_dtype) -> torch.Tensor:
    """o [R, HV, NC, C, V] in out_dtype from chunked q, k, g (as `ut_transform`), the UT quantities and the entering
    states."""
    R, HV, NC, C, V = U.shape
    K, groups = qc.shape[-1], _groups(qc, U)
    key = _per_key(gc)
    P = key_scores(*(_per_value_head(x, groups) for x in (qc, kc)), gc) if key else U
    o = U.new_empty(R, HV, NC, C, V, dtype=out_dtype)
    tune.launch(_out_kernel, "delta_out_kernel", lambda cfg: (triton.cdiv(V, cfg["BV"]), NC, R * HV),
                (qc, kc, gc if gc is not None else U, P, U, Wk, entering, o, scale, K, V),
                dict(C=C, GROUPS=groups, HAS_G=gc is not None, KEY=key, PREC=_precision(qc.dtype)),
                (K, V, gc is not None, key, qc.dtype, qc.device), dict(BK=_block(K), BV=_block(V)), tuner=OUT_TUNER)
    return o


def _prepare(q, k, v, beta, g, cu_seqlens):
    # -> layout and the chunked inputs: qc, kc [R, H, NC, C, K], vc [R, HV, NC, C, V] (input dtype), bc [R, HV, NC, C]
    #    and gc (acc dtype): None, the log-decay per head [R, HV, NC, C], or per key its within-chunk cumsum
    #    [R, HV, NC, C, K]
    B, T, H, K = k.shape
    dt = acc_dtype(k.dtype)
    layout = chunk_layout(B, T, cu_seqlens, CHUNK_SIZE, k.device)
    qc, kc, vc = (_chunked(x, layout) for x in (q, k.to(q.dtype), v.to(q.dtype)))
    bc = _chunked(beta.to(dt).unsqueeze(-1), layout).squeeze(-1)
    if g is None or g.dim() == 3:
        gc = None if g is None else _chunked(g.to(dt).unsqueeze(-1), layout).squeeze(-1)
    else:   # the 16-row kernels take the cumulative form (lsp/ops/linear/triton_intra.py)
        gc = _chunked(g.to(dt), layout).cumsum(3)
    return layout, qc, kc, vc, bc, gc


def _states(layout, kc, vc, bc, gc, initial_state):
    # UT transform and the chunk scan: Tinv, U, Wk, Kd, Akk [R, HV, NC, C, C] (per key) or None, decay [R, HV, NC]
    # or [R, HV, NC, K] or None, entering [R, HV, NC, K, V], final
    Akk = None
    if _per_key(gc):
        keys = _per_value_head(kc, _groups(kc, bc))
        Akk = key_scores(keys, keys, gc)
    Tinv, U, Wk, Kd = ut_transform(kc, vc, bc, gc, Akk)
    if gc is None:
        decay = None
    else:                                                                     # exp(G_C)
        decay = gc[..., -1, :].exp() if Akk is not None else gc.sum(-1).exp()
    chunks = chunk_mod.DeltaChunks(layout, kc, None, Kd, Wk, U, decay, "triton", kc.dtype)
    init = None if initial_state is None else initial_state.to(U.dtype)
    entering, final = chunk_mod._triton_scan(chunks, U, init)
    return Tinv, U, Wk, Kd, Akk, decay, entering.contiguous(), final


def triton_forward(q, k, v, beta, g, scale, initial_state, cu_seqlens):
    """(o [B, T, HV, V] in q's dtype, final [B or N, HV, K, V]); arguments as `lsp.ops.delta_rule` (q, k at H heads:
    the kernels read q/k head j // G for value head j)."""
    layout, qc, kc, vc, bc, gc = _prepare(q, k, v, beta, g, cu_seqlens)
    _, U, Wk, _, _, _, entering, final = _states(layout, kc, vc, bc, gc, initial_state)
    o = output(qc, kc, gc, U, Wk, entering, scale, q.dtype)
    return chunk_mod.from_chunks(o, layout), final


def triton_backward(q, k, v, beta, g, initial_state, scale, cu_seqlens, d_o, d_final):
    """Gradients (dq, dk, dv, dbeta, dg or None, dinit or None) from the inputs (the forward's states recomputed);
    the kernels write dq, dk per value head, summed here over each group of G."""
    layout, qc, kc, vc, bc, gc = _prepare(q, k, v, beta, g, cu_seqlens)
    Tinv, U, Wk, Kd, Akk, decay, S, _ = _states(layout, kc, vc, bc, gc, initial_state)
    R, H, NC, C, V = vc.shape                                                 # H: the HV value heads
    K, groups = kc.shape[-1], _groups(kc, bc)
    BK, BV = _block(K), _block(V)
    dOc = _chunked(d_o.to(q.dtype), layout)
    key = Akk is not None
    g_arg, prec, grid = gc if gc is not None else bc, _precision(qc.dtype), (NC, R * H)
    dUo, W, dW, dv = (U.new_empty(R, H, NC, C, V) for _ in range(4))
    dE = U.new_empty(R, H, NC, K, V)
    q_v, k_v = (_per_value_head(x, groups) for x in (qc, kc)) if key else (qc, kc)   # the 16-row kernels' q, k
    P = key_scores(q_v, k_v, gc) if key else U
    _bwd_out_kernel[(triton.cdiv(V, BV), NC, R * H)](qc, kc, g_arg, P, Wk, dOc, dUo, dE, scale, K, V, C=C,
                                                     GROUPS=groups, BK=BK, BV=BV, HAS_G=gc is not None, KEY=key,
                                                     PREC=prec, num_warps=WARPS)
    del P
    reset, end, _ = chunk_mod.scan_tables(layout, U.device)
    d_next, dinit = scan_backward(Kd, Wk, decay if decay is not None else U, reset, end, dE,
                                  d_final.to(U.dtype).contiguous(), decay is not None, precision(k.dtype))
    TdW, dkk = U.new_empty(R, H, NC, C, V), U.new_empty(R, H, NC, C, C)
    dbeta = U.new_empty(R, H, NC, C)
    dG = U.new_empty(gc.shape) if key else U.new_empty(R, H, NC, C)
    small = dict(BK=_block(K, BWD_BLOCK), BV=_block(V, BWD_BLOCK), num_warps=WARPS, num_stages=BWD_STAGES)
    narrow = {**small, "BV": _block(V, BWD_V_BLOCK)}
    _bwd_w_kernel[grid](vc, bc, Tinv, U, Wk, Kd, S, dUo, d_next, W, dW, TdW, dv, dbeta, K, V, C=C, PREC=prec, **narrow)
    _bwd_dA_kernel[grid](kc, vc, bc, g_arg, Akk if key else bc, Tinv, S, dW, dkk, dbeta, dG, K, V, C=C,
                         GROUPS=groups, HAS_G=gc is not None, KEY=key, PREC=prec, **narrow)
    dq, dk = (U.new_empty(R, H, NC, C, K) for _ in range(2))
    if key:
        ddec = (S * d_next).sum(-1)                                           # [R, H, NC, K]
        dP = U.new_empty(R, H, NC, C, C)
        _bwd_k_key_kernel[grid](qc, kc, bc, gc, S, dOc, W, TdW, d_next, ddec, dq, dk, dG, dP, dbeta, scale, K, V,
                                C=C, GROUPS=groups, PREC=prec, **small)
        key_intra_grads(q_v, k_v, gc, dP, dkk, dq, dk, dG)
    else:
        ddec = (S * d_next).sum((-1, -2)) if decay is not None else U.new_zeros(R, H, NC)
        _bwd_k_kernel[grid](qc, kc, bc, g_arg, S, dOc, W, TdW, d_next, dkk, dbeta, ddec.contiguous(), dq, dk, dG,
                            scale, K, V, C=C, GROUPS=groups, HAS_G=gc is not None, PREC=prec, **small)
    dq, dk = (x.view(R, H // groups, groups, NC, C, K).sum(2) for x in (dq, dk))    # Σ over each group
    dg = dG.flip(3).cumsum(3).flip(3)                                         # G = cumsum(g) within the chunk
    unchunk = lambda x, like: chunk_mod.from_chunks(x, layout).to(like.dtype)  # noqa: E731
    per_token = lambda x, like: unchunk(x.unsqueeze(-1), like).squeeze(-1)  # noqa: E731
    dg = None if g is None else (unchunk(dg, g) if key else per_token(dg, g))
    return (unchunk(dq, q), unchunk(dk, k), unchunk(dv, v), per_token(dbeta, beta), dg,
            None if initial_state is None else dinit)


def triton_delta_rule(q, k, v, beta, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """`lsp.ops.delta_rule` with backend="triton" (arguments already validated; q, k at their H heads): the torch
    custom op `lsp::delta_rule` (custom_ops.py), whose autograd keeps only the inputs."""
    from .custom_ops import delta_rule_op

    o, final = delta_rule_op(q, k, v, beta, g, initial_state, scale, cu_seqlens)
    return o, (final if output_final_state else None)
