r"""The DPLR delta rule with backend="triton": chunk.py's WY algorithm in Triton kernels, forward and backward.

Forward, launches independent of T (kernels in `triton_kernels.py`, the linear op's per-key scores, the delta rule's
chunk scan):

    P_qb, P_qk, S_a⁺b, S_a⁺k   inclusive per-key scores      lsp.ops.linear `_intra_scores_kernel` (4 launches)
    T = (I − A_ab)^-1                                       `_wy_inverse_kernel`   one program per chunk
    U' = [U0; V], Wk' = [−W; 0], Kd' = [Bd; Kd]             `_wy_apply_kernel`     one program per chunk
    S_c (entering states), final states                     lsp.ops.delta `_scan_fwd` (2C rows, a decay per key)
    o                                                       `_out_kernel`          one program per (chunk, V block)

Backward: only the inputs are kept (`lsp::dplr_delta_rule`, custom_ops.py); the scores, T, U', Wk', Kd' and the
entering states are recomputed by the forward's kernels (the output excepted), then, with dS the gradient of the
state after every chunk:

    dE (entering states' direct part), dU', u; dP_qb, dP_qk; dq, dWk'   `_bwd_out_kernel`, `_bwd_scores_kernel`,
                                                                     `_bwd_q_kernel`
    dS, dinit (reverse chain); dKd', dWk', dU', d exp(G_C)            lsp.ops.delta `_scan_bwd`, then four batched
                                                                     products (`triton_scan.scan_grads`)
    dS_a⁺k, dT; dS_a⁺b; dv, da, db, dk, dG, dG⁻                      `_bwd_wy_scores_kernel`, `_bwd_wy_ab_kernel`,
                                                                     `_bwd_wy_kernel`
    the scores' gradients to q, k, a⁺, b                              lsp.ops.linear `_intra_dqk_kernel` (4)

and for each score S(x, y) the decay receives x ⊙ dx − y ⊙ dy (S_ij = Σ_c x_ic y_jc exp(G_ic − G_jc)); dg is the
reverse cumulative sum of dG inside each chunk, minus dG⁻ (G⁻ = G − g). What runs in torch: padding, the cumulative
sum of g, the shift of a, the scan's four batched products and these elementwise sums.

fp64 inputs (and T == 0) run chunk.py's torch path whole (the score kernels accumulate in fp32), as the linear op's
Triton backend does.
"""
from __future__ import annotations

import torch
import triton

from lsp.names import CHUNK_SIZE
from lsp.ops.delta.chunk import chunk_scan
from lsp.ops.delta.triton_scan import precision, scan_grads
from lsp.ops.linear import triton_intra as lin_intra
from lsp.ops.linear.layout import chunk_layout
from lsp.ops.linear.triton_chunk import CHUNK_WARPS, SUB_BLOCK, SUB_BLOCK_K, _block, _intra_scores, _precision

from . import chunk as chunk_mod
from . import triton_kernels as kern

WARPS = 8           # [64, 64] fp32 tiles (the delta rule's choice for its per-chunk kernels)
# K and V blocks of every per-chunk kernel: 32 (with 64 the apply and output kernels spill 600 / 216 B per thread on
# sm_90a, bf16, K = V = 64; the backward kernels hold four [C, C] fp32 tiles: two scores and two accumulators)
BLOCK = 32
WY_BWD_BLOCK_K = 16  # `_bwd_wy_kernel`'s K loop holds ten [C, BK] fp32 tiles: at 32 it spilled 144 B (sm_90a, bf16)


def _padded_inputs(q, k, v, a, b, g, cu_seqlens):
    # -> layout; qp, kp, vp, ap, bp [R, Tp, H, *] in q's dtype; a⁺ (a shifted up one token inside each chunk);
    #    gp, G [R, Tp, H, K] fp32 (g and its within-chunk cumulative sum)
    B, T, H, K = q.shape
    layout = chunk_layout(B, T, cu_seqlens, CHUNK_SIZE, q.device)
    qp, kp, vp, ap, bp = (layout.pad(x.to(q.dtype).contiguous()) for x in (q, k, v, a, b))
    R, Tp = qp.shape[:2]
    gp = layout.pad(g.float().contiguous())
    G = gp.view(R, Tp // CHUNK_SIZE, CHUNK_SIZE, H, K).cumsum(2).view(R, Tp, H, K)
    a_next = torch.cat([ap[:, 1:], torch.zeros_like(ap[:, :1])], dim=1).view(R, Tp // CHUNK_SIZE, CHUNK_SIZE, H, K)
    a_next[:, :, -1] = 0                                                  # the last token of a chunk reads none
    return layout, qp, kp, vp, ap, bp, a_next.view(R, Tp, H, K), gp, G


def _scores(qp, kp, bp, a_next, G):
    # the four inclusive per-key scores [R, Tp, H, C] fp32: P_qb, P_qk, S_a⁺b, S_a⁺k
    return (_intra_scores(qp, bp, G), _intra_scores(qp, kp, G), _intra_scores(a_next, bp, G),
            _intra_scores(a_next, kp, G))


def _wy(layout, ap, bp, kp, vp, gp, G, S_ab, S_ak):
    # -> T = (I − A_ab)^-1 [R, H, NC, C, C], U', Wk', Kd' [R, H, NC, 2C, *] fp32, the decay exp(G_C) [R, H, NC, K]
    R, Tp, H, K = kp.shape
    V, NC, C = vp.shape[-1], layout.num_chunks, CHUNK_SIZE
    Tinv = torch.empty(R, H, NC, C, C, dtype=torch.float32, device=kp.device)
    kern._wy_inverse_kernel[(NC, R * H)](S_ab, Tinv, Tp, H, C=C, BS=SUB_BLOCK, num_warps=WARPS)
    U2 = torch.empty(R, H, NC, 2 * C, V, dtype=torch.float32, device=kp.device)
    Wk2, Kd2 = (torch.empty(R, H, NC, 2 * C, K, dtype=torch.float32, device=kp.device) for _ in range(2))
    kern._wy_apply_kernel[(NC, R * H)](ap, bp, kp, vp, G, gp, S_ak, Tinv, U2, Wk2, Kd2, Tp, H, K, V, C=C,
                                       BK=_block(K, BLOCK), BV=_block(V, BLOCK), PREC=_precision(kp.dtype),
                                       num_warps=WARPS)
    decay = G[:, C - 1 :: C].permute(0, 2, 1, 3).exp().contiguous()     # [R, H, NC, K]
    return Tinv, U2, Wk2, Kd2, decay


def _chunks(layout, U2, Wk2, Kd2, decay, input_dtype):
    # what chunk_scan reads (k, G and b are not read by the scan: placeholders of the right leading shape)
    return chunk_mod.DplrChunks(layout=layout, k=Kd2[..., :CHUNK_SIZE, :], G=None, Kd=Kd2, Wk=Wk2, U=U2,
                                decay=decay, scan_backend="triton", input_dtype=input_dtype,
                                b=Kd2[..., :CHUNK_SIZE, :])


def triton_forward(q, k, v, a, b, g, scale, initial_state, cu_seqlens):
    """(o [B, T, H, V] in q's dtype, final [B or N, H, K, V] fp32); arguments as `lsp.ops.dplr_delta_rule`."""
    layout, qp, kp, vp, ap, bp, a_next, gp, G = _padded_inputs(q, k, v, a, b, g, cu_seqlens)
    P_qb, P_qk, S_ab, S_ak = _scores(qp, kp, bp, a_next, G)
    _, U2, Wk2, Kd2, decay = _wy(layout, ap, bp, kp, vp, gp, G, S_ab, S_ak)
    init = None if initial_state is None else initial_state.float()
    entering, final = chunk_scan(_chunks(layout, U2, Wk2, Kd2, decay, q.dtype), U2, init)
    R, Tp, H, K = qp.shape
    V, NC = vp.shape[-1], layout.num_chunks
    o = torch.empty(R, Tp, H, V, dtype=q.dtype, device=q.device)
    BV = _block(V, BLOCK)
    kern._out_kernel[(triton.cdiv(V, BV), NC, R * H)](qp, vp, G, P_qb, P_qk, U2, Wk2, entering.contiguous(), o,
                                                      scale, Tp, H, K, V, NC, C=CHUNK_SIZE, BK=_block(K, BLOCK), BV=BV,
                                                      PREC=_precision(q.dtype), num_warps=WARPS)
    return layout.unpad(o), final


def _to_chunk_layout(x, NC):
    # [R, Tp, H, D] -> [R, H, NC, C, D] (a view)
    R, Tp, H, D = x.shape
    return x.view(R, NC, CHUNK_SIZE, H, D).permute(0, 3, 1, 2, 4)


def _to_padded_layout(x):
    # [R, H, NC, C, D] -> contiguous [R, Tp, H, D]
    R, H, NC, C, D = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(R, NC * C, H, D).contiguous()


def _score_grads(x, y, G, dS, dx):
    # the gradient of S(x, y) [R, Tp, H, C] given dS: adds to dx (fp32, [R, Tp, H, K]) and returns dy
    R, Tp, H, K = x.shape
    dy = torch.empty(R, Tp, H, K, dtype=torch.float32, device=x.device)
    lin_intra._intra_dqk_kernel[(CHUNK_SIZE // SUB_BLOCK, Tp // CHUNK_SIZE, R * H)](
        x, y, G, dS, dx, dy, Tp, H, K, C=CHUNK_SIZE, BT=SUB_BLOCK, BK=_block(K, SUB_BLOCK_K),
        PREC=_precision(x.dtype), num_warps=CHUNK_WARPS)
    return dy


def _scan_grads(chunks, entering, d_enter, d_final):
    # the chunk scan's gradients in the half-steps it ran in (chunk.half_steps): the reverse chain in the Triton
    # scan, its products batched (`triton_scan.scan_grads`) -> dKd', dWk', dU' [R, H, NC, 2C, *], ddecay, dinit
    R, H, NC, C2, K = chunks.Kd.shape
    Kd, Wk, U, decays, reset, end, _ = chunk_mod.half_steps(chunks, chunks.Kd, chunks.Wk, chunks.U, chunks.decay)
    enter2 = torch.zeros(R, H, NC, 2, K, entering.shape[-1], dtype=entering.dtype, device=entering.device)
    enter2[:, :, :, 0] = entering
    enter2[:, :, :, 1] = chunks.decay[..., None] * entering + Kd[:, :, 0::2].transpose(-1, -2) @ (
        U[:, :, 0::2] - Wk[:, :, 0::2] @ entering)                                     # the state between them
    d_enter2 = torch.zeros_like(enter2)
    d_enter2[:, :, :, 0] = d_enter
    dKd, dWk, dU, ddec, dinit = scan_grads(Kd, Wk, U, decays, enter2.view(R, H, 2 * NC, K, -1), reset, end,
                                           d_enter2.view(R, H, 2 * NC, K, -1), d_final.float().contiguous(),
                                           precision(chunks.input_dtype))
    whole = lambda x: x.reshape(R, H, NC, C2, x.shape[-1])  # noqa: E731
    return whole(dKd), whole(dWk), whole(dU), ddec[:, :, 0::2], dinit


def _output_grads(layout, qp, vp, G, P_qb, P_qk, U2, Wk2, entering, dop, scale):
    # `_bwd_out_kernel`, `_bwd_scores_kernel`, `_bwd_q_kernel` -> dq (the part through q ⊙ exp G), dP_qb, dP_qk
    # [R, Tp, H, *] fp32; dU', dWk' [R, H, NC, 2C, *]; dE [R, H, NC, K, V] (the entering states' direct gradient)
    R, Tp, H, K = qp.shape
    V, NC, C = vp.shape[-1], layout.num_chunks, CHUNK_SIZE
    BK, BV, prec = _block(K, BLOCK), _block(V, BLOCK), _precision(qp.dtype)
    f32 = dict(dtype=torch.float32, device=qp.device)
    dU2, dWk2, dE = torch.empty_like(U2), torch.empty_like(Wk2), torch.empty(R, H, NC, K, V, **f32)
    u = torch.empty(R, H, NC, C, V, **f32)
    kern._bwd_out_kernel[(triton.cdiv(V, BV), NC, R * H)](qp, G, P_qb, P_qk, U2, Wk2, entering, dop, dU2, u, dE,
                                                          scale, Tp, H, K, V, NC, C=C, BK=BK, BV=BV, PREC=prec,
                                                          num_warps=WARPS)
    dP_qb, dP_qk = torch.empty(R, Tp, H, C, **f32), torch.empty(R, Tp, H, C, **f32)
    kern._bwd_scores_kernel[(NC, R * H)](vp, u, dop, dP_qb, dP_qk, scale, Tp, H, V, NC, C=C, BV=BV, PREC=prec,
                                         num_warps=WARPS)
    dq = torch.empty(R, Tp, H, K, **f32)
    kern._bwd_q_kernel[(triton.cdiv(K, BK), NC, R * H)](G, entering, dop, dU2, dq, dWk2, scale, Tp, H, K, V, NC, C=C,
                                                        BK=BK, BV=BV, PREC=prec, num_warps=WARPS)
    return dq, dP_qb, dP_qk, dU2, dWk2, dE


def _wy_grads(layout, ap, bp, kp, vp, G, gp, S_ak, Tinv, dKd2, dWk2, dU2, ddecay):
    # `_bwd_wy_scores_kernel`, `_bwd_wy_ab_kernel`, `_bwd_wy_kernel` -> da, db, dk, dv, dG, dG⁻ [R, Tp, H, *] fp32
    # (the WY solve's and Kd's parts) and the gradients of the strict scores' sources dS_a⁺b, dS_a⁺k [R, Tp, H, C]
    R, Tp, H, K = kp.shape
    V, NC, C = vp.shape[-1], layout.num_chunks, CHUNK_SIZE
    BK, BV, prec = _block(K, BLOCK), _block(V, BLOCK), _precision(kp.dtype)
    f32 = dict(dtype=torch.float32, device=kp.device)
    dKd2, dWk2, dU2, ddecay = (x.contiguous() for x in (dKd2, dWk2, dU2, ddecay))
    dS_ab, dS_ak = torch.zeros(R, Tp, H, C, **f32), torch.zeros(R, Tp, H, C, **f32)   # a chunk's last row stays 0
    dTinv = torch.empty(R, H, NC, C, C, dtype=kp.dtype, device=kp.device)   # dT, rounded as the products take it
    kern._bwd_wy_scores_kernel[(NC, R * H)](ap, vp, G, gp, S_ak, Tinv, dWk2, dU2, dS_ak, dTinv, Tp, H, K, V, NC,
                                            C=C, BK=BK, BV=BV, PREC=prec, num_warps=WARPS)
    kern._bwd_wy_ab_kernel[(NC, R * H)](Tinv, dTinv, dS_ab, Tp, H, NC, C=C, PREC=prec, num_warps=WARPS)
    da, db, dk, dG, dG_ex = (torch.empty(R, Tp, H, K, **f32) for _ in range(5))
    dv = torch.empty(R, Tp, H, V, **f32)
    kern._bwd_wy_kernel[(NC, R * H)](ap, bp, kp, vp, G, gp, S_ak, Tinv, dKd2, dWk2, dU2, ddecay, da, db, dk, dv, dG,
                                     dG_ex, Tp, H, K, V, NC, C=C, BK=_block(K, WY_BWD_BLOCK_K), BV=BV, PREC=prec,
                                     num_warps=WARPS)
    return da, db, dk, dv, dG, dG_ex, dS_ab, dS_ak


def _downstream_grads(layout, qp, kp, vp, ap, bp, G, gp, scores, initial_state, scale, d_o, d_final):
    # the gradients (padded layout, fp32) of q, k, v, a, b, G, G⁻ = G − g and of the four scores, and that of the
    # initial state (or None), with the forward's WY quantities and entering states recomputed by its kernels: the
    # output's in `_bwd_out_kernel`, the chunk scan's reverse chain in the Triton scan (`triton_scan.scan_grads`,
    # its products batched), the WY solve's in `_bwd_wy_kernel`
    P_qb, P_qk, S_ab, S_ak = scores
    Tinv, U2, Wk2, Kd2, decay = _wy(layout, ap, bp, kp, vp, gp, G, S_ab, S_ak)
    init = None if initial_state is None else initial_state.float()
    entering, _ = chunk_scan(_chunks(layout, U2, Wk2, Kd2, decay, qp.dtype), U2, init)
    dop = layout.pad(d_o.to(qp.dtype).contiguous())
    dq, dP_qb, dP_qk, dU_out, dWk_out, d_enter = _output_grads(layout, qp, vp, G, P_qb, P_qk, U2, Wk2,
                                                               entering.contiguous(), dop, scale)
    dKd, dWk, dU, ddecay, dinit = _scan_grads(_chunks(layout, U2, Wk2, Kd2, decay, qp.dtype), entering, d_enter,
                                              d_final)
    da, db, dk, dv, dG, dG_ex, dS_ab, dS_ak = _wy_grads(layout, ap, bp, kp, vp, G, gp, S_ak, Tinv, dKd,
                                                        dWk + dWk_out, dU + dU_out, ddecay)
    return [dq, dk, dv, da, db, dG + qp * dq, dG_ex, dP_qb, dP_qk, dS_ab, dS_ak], \
        (None if initial_state is None else dinit)


def _within_chunks(x):
    # [R, Tp, H, K] -> [R, NC, C, H, K] (a view)
    R, Tp, H, K = x.shape
    return x.view(R, Tp // CHUNK_SIZE, CHUNK_SIZE, H, K)


def triton_backward(q, k, v, a, b, g, initial_state, scale, cu_seqlens, d_o, d_final):
    """Gradients (dq, dk, dv, da, db, dg [B, T, H, *] in the inputs' dtypes, dinit fp32 or None) from the inputs:
    the scores recomputed by the kernels, the rest as the module docstring says."""
    layout, qp, kp, vp, ap, bp, a_next, gp, G = _padded_inputs(q, k, v, a, b, g, cu_seqlens)
    scores = _scores(qp, kp, bp, a_next, G)
    grads, dinit = _downstream_grads(layout, qp, kp, vp, ap, bp, G, gp, scores, initial_state, scale, d_o, d_final)
    dq, dk, dv, da, db, dG, dG_ex, dP_qb, dP_qk, dS_ab, dS_ak = grads
    dq_s, da_s = torch.zeros_like(dq), torch.zeros_like(dq)              # the scores' parts of dq and da⁺
    db_s = _score_grads(qp, bp, G, dP_qb, dq_s) + _score_grads(a_next, bp, G, dS_ab, da_s)
    dk_s = _score_grads(qp, kp, G, dP_qk, dq_s) + _score_grads(a_next, kp, G, dS_ak, da_s)
    dG = dG + dG_ex + qp * dq_s + a_next * da_s - bp * db_s - kp * dk_s
    dg = _within_chunks(dG).flip(2).cumsum(2).flip(2).reshape(dG.shape) - dG_ex   # G = cumsum(g), G⁻ = G − g
    da_w = _within_chunks(da)
    da_w[:, :, 1:] += _within_chunks(da_s)[:, :, :-1]                     # a⁺[t] = a[t + 1] inside the chunk
    unpad = lambda x, like: layout.unpad(x).to(like.dtype)  # noqa: E731
    return (unpad(dq + dq_s, q), unpad(dk + dk_s, k), unpad(dv, v), unpad(da, a), unpad(db + db_s, b),
            unpad(dg, g), dinit)


def triton_dplr_delta_rule(q, k, v, a, b, g, scale, initial_state=None, output_final_state=False,
                           cu_seqlens=None):
    """`lsp.ops.dplr_delta_rule` with backend="triton" (arguments already validated): the torch custom op
    `lsp::dplr_delta_rule` (custom_ops.py), whose autograd keeps only the inputs; fp64 inputs and T == 0 run
    chunk.py."""
    if q.dtype == torch.float64 or q.shape[1] == 0:            # no kernel grid for T == 0
        return chunk_mod.chunk_dplr_delta_rule(q, k, v, a, b, g, scale, initial_state, output_final_state,
                                               cu_seqlens)
    from .custom_ops import dplr_delta_rule_op

    o, final = dplr_delta_rule_op(q, k, v, a, b, g, initial_state, scale, cu_seqlens)
    return o, (final if output_final_state else None)
