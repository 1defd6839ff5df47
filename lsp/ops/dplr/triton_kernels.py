r"""Triton kernels of the DPLR delta rule's per-chunk work: the WY solve and the output (the per-key scores they
read are the linear op's `_intra_scores_kernel`; the launches are in `triton_chunk.py`).

Layouts: the inputs, G and the scores are in the padded layout of the linear kernels ([R, Tp, H, D], Tp = NC · C,
C = 64; scores [R, Tp, H, C], row i of a chunk holding its C columns j); what the chunk scan reads is in the chunk
layout of `lsp/ops/delta/chunk.py` with 2C rows per chunk ([R, H, NC, 2C, D]: the low-rank rows, then the kv rows);
entering states are [R, H, NC, K, V]. Per chunk (chunk.py's docstring), with S_xy the inclusive scores of
x against y (j <= i) and A_xy the strict ones of a (A_xy[i] = S_{a⁺y}[i - 1], a⁺ = a shifted up one token):

    T = (I − A_ab)^-1                                                         `_wy_inverse_kernel`
    U0 = T (A_ak V),  W = T (a ⊙ exp G⁻),  Kd' = [b; k] ⊙ exp(G_C − G),
    U' = [U0; V],  Wk' = [−W; 0]                                              `_wy_apply_kernel`
    o = scale [ (q ⊙ exp G) E + P_qb (U0 + W E) + P_qk V ]                    `_out_kernel`
    its gradients: dE, dU' and u; dP_qb, dP_qk; dq, dWk'                  `_bwd_out_kernel`, `_bwd_scores_kernel`,
                                                                             `_bwd_q_kernel`
    the WY solve's: dS_a⁺k, dT; dS_a⁺b; dv, da, db, dk, dG, dG⁻          `_bwd_wy_scores_kernel`, `_bwd_wy_ab_kernel`,
                                                                             `_bwd_wy_kernel`

The inverse is the delta rule's (lsp/ops/delta/triton_intra.py: 16-row blocks, forward substitution on the diagonal
blocks, the block recurrence below them, fp32 with input_precision="ieee"), applied to −A_ab. The chunk-level
products take their operands in the inputs' dtype (T and the states rounded to it, as fla does) and accumulate in
fp32; fp32 inputs run them in full precision (PREC).
"""
from __future__ import annotations

import triton
import triton.language as tl

from lsp.ops.delta.triton_intra import _inverse_diag, _rows, _store_block_inverse, _store_rows
from lsp.ops.linear.triton_kernels import _load_raw, _load_row, _load_state, _load_tile, _store_tile


@triton.jit
def _strict_tile(S, r, c, hh, Tp, H, C: tl.constexpr, i0, j0, BR: tl.constexpr, BC: tl.constexpr):
    # [BR, BC] tile (rows i0.., columns j0.. of chunk c) of the strict scores A[i, j] = S[i - 1, j] (row 0 zero)
    ii = i0 + tl.arange(0, BR)
    jj = j0 + tl.arange(0, BC)
    src = c * C + tl.where(ii >= 1, ii - 1, 0)
    ptrs = S + ((r.to(tl.int64) * Tp + src.to(tl.int64)) * H + hh) * C
    keep = (ii >= 1)[:, None] & (ii[:, None] > jj[None, :])
    return tl.load(ptrs[:, None] + jj[None, :], mask=keep, other=0.0).to(tl.float32)


@triton.jit
def _wy_inverse_kernel(S_ab, Tinv, Tp, H, C: tl.constexpr, BS: tl.constexpr):
    # grid (NC, R * H): Tinv[chunk] = (I − A_ab)^-1 [C, C] for C = 4 BS, as the delta rule's `_ut_inverse_kernel`
    # with its A = −A_ab (block rows 0..3; chunk = rh · NC + c, the chunk layout)
    c, rh = tl.program_id(0), tl.program_id(1)
    r, hh = rh // H, rh % H
    chunk = rh * tl.num_programs(0) + c
    ACC: tl.constexpr = Tinv.dtype.element_ty
    t00 = _inverse_diag(-_strict_tile(S_ab, r, c, hh, Tp, H, C, 0, 0, BS, BS), BS)
    t11 = _inverse_diag(-_strict_tile(S_ab, r, c, hh, Tp, H, C, BS, BS, BS, BS), BS)
    t22 = _inverse_diag(-_strict_tile(S_ab, r, c, hh, Tp, H, C, 2 * BS, 2 * BS, BS, BS), BS)
    t33 = _inverse_diag(-_strict_tile(S_ab, r, c, hh, Tp, H, C, 3 * BS, 3 * BS, BS, BS), BS)
    a10 = -_strict_tile(S_ab, r, c, hh, Tp, H, C, BS, 0, BS, BS)
    a21 = -_strict_tile(S_ab, r, c, hh, Tp, H, C, 2 * BS, BS, BS, BS)
    a32 = -_strict_tile(S_ab, r, c, hh, Tp, H, C, 3 * BS, 2 * BS, BS, BS)
    a20 = -_strict_tile(S_ab, r, c, hh, Tp, H, C, 2 * BS, 0, BS, BS)
    a31 = -_strict_tile(S_ab, r, c, hh, Tp, H, C, 3 * BS, BS, BS, BS)
    a30 = -_strict_tile(S_ab, r, c, hh, Tp, H, C, 3 * BS, 0, BS, BS)
    _store_block_inverse(Tinv, chunk, C, BS, ACC, t00, t11, t22, t33, a10, a20, a21, a30, a31, a32)


@triton.jit
def _wy_apply_kernel(a, b, k, v, G, g, S_ak, Tinv, U2, Wk2, Kd2, Tp, H, K, V, C: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, PREC: tl.constexpr):
    # grid (NC, R * H): U' = [T (A_ak V); V], Wk' = [−T (a ⊙ exp G⁻); 0], Kd' = [b; k] ⊙ exp(G_C − G) of one chunk
    # (2C rows each, chunk layout), over V and K blocks
    c, rh = tl.program_id(0), tl.program_id(1)
    r, hh = rh // H, rh % H
    chunk = rh * tl.num_programs(0) + c
    t0 = c * C
    DT: tl.constexpr = v.dtype.element_ty
    T = _rows(Tinv, chunk, C, C, 0, C, C, 0).to(DT)
    A_ak = _strict_tile(S_ak, r, c, hh, Tp, H, C, 0, 0, C, C).to(DT)
    for v0 in range(0, V, BV):
        v_c = _load_raw(v, r, t0, hh, Tp, H, V, C, BV, v0)
        av = tl.dot(A_ak, v_c, input_precision=PREC).to(DT)
        _store_rows(U2, tl.dot(T, av, input_precision=PREC), chunk, 2 * C, V, 0, C, BV, v0)
        _store_rows(U2, v_c.to(tl.float32), chunk, 2 * C, V, C, C, BV, v0)
    for k0 in range(0, K, BK):
        G_c = _load_tile(G, r, t0, hh, Tp, H, K, C, BK, k0)
        G_end = _load_row(G, r, t0 + C - 1, hh, Tp, H, K, BK, k0)
        a_ex = _load_tile(a, r, t0, hh, Tp, H, K, C, BK, k0) * tl.exp(G_c - _load_tile(g, r, t0, hh, Tp, H, K, C, BK,
                                                                                      k0))
        _store_rows(Wk2, -tl.dot(T, a_ex.to(DT), input_precision=PREC), chunk, 2 * C, K, 0, C, BK, k0)
        _store_rows(Wk2, tl.zeros([C, BK], dtype=tl.float32), chunk, 2 * C, K, C, C, BK, k0)
        to_end = tl.exp(G_end[None, :] - G_c)
        _store_rows(Kd2, _load_tile(b, r, t0, hh, Tp, H, K, C, BK, k0) * to_end, chunk, 2 * C, K, 0, C, BK, k0)
        _store_rows(Kd2, _load_tile(k, r, t0, hh, Tp, H, K, C, BK, k0) * to_end, chunk, 2 * C, K, C, C, BK, k0)


@triton.jit
def _e_tile(E, c, rh, NC, K, V, k0, v0, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr):
    # [BK, BV] block of the entering state of chunk c (fp32 in memory), as a dot operand
    return _load_state(E, rh, c, NC, K, V, k0, v0, BK, BV).to(DT)


@triton.jit
def _q_decayed(q, G, r, t0, hh, Tp, H, K, C: tl.constexpr, BK: tl.constexpr, k0):
    # [C, BK] q ⊙ exp(G) of one chunk and K block (fp32): the read of the entering state
    return _load_tile(q, r, t0, hh, Tp, H, K, C, BK, k0) * tl.exp(_load_tile(G, r, t0, hh, Tp, H, K, C, BK, k0))


@triton.jit
def _out_kernel(q, v, G, P_qb, P_qk, U2, Wk2, E, o, scale, Tp, H, K, V, NC, C: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, PREC: tl.constexpr):
    # grid (cdiv(V, BV), NC, R * H): o = scale [ (q ⊙ exp G) E + P_qb (U0 + W E) + P_qk V ] for one chunk and V
    # block; E: [R, H, NC, K, V] entering states (fp32), products over K in BK blocks
    vb, c, rh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r, hh = rh // H, rh % H
    chunk = rh * NC + c
    t0, v0 = c * C, vb * BV
    DT: tl.constexpr = q.dtype.element_ty
    acc = tl.zeros([C, BV], dtype=tl.float32)
    u = _rows(U2, chunk, 2 * C, V, 0, C, BV, v0).to(tl.float32)             # the low-rank reads: U0 + W E
    for k0 in range(0, K, BK):
        e_b = _e_tile(E, c, rh, NC, K, V, k0, v0, BK, BV, DT)
        q_dec = _q_decayed(q, G, r, t0, hh, Tp, H, K, C, BK, k0)
        acc += tl.dot(q_dec.to(DT), e_b, input_precision=PREC)
        u -= tl.dot(_rows(Wk2, chunk, 2 * C, K, 0, C, BK, k0).to(DT), e_b, input_precision=PREC)
    acc += tl.dot(_load_tile(P_qb, r, t0, hh, Tp, H, C, C, C).to(DT), u.to(DT), input_precision=PREC)
    acc += tl.dot(_load_tile(P_qk, r, t0, hh, Tp, H, C, C, C).to(DT), _load_raw(v, r, t0, hh, Tp, H, V, C, BV, v0),
                  input_precision=PREC)
    _store_tile(o, scale * acc, r, t0, hh, Tp, H, V, C, BV, v0)


@triton.jit
def _bwd_out_kernel(q, G, P_qb, P_qk, U2, Wk2, E, dO, dU2, u_out, dE, scale, Tp, H, K, V, NC, C: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    # grid (cdiv(V, BV), NC, R * H), one chunk and V block of `_out_kernel`'s gradients, with dO' = scale dO:
    #   dU' = [P_qbᵀ dO'; P_qkᵀ dO'],  dE = (q ⊙ exp G)ᵀ dO' − Wk0ᵀ P_qbᵀ dO',  and u = U0 − Wk0 E stored for
    #   `_bwd_scores_kernel` (Wk0, U0: the first C rows of Wk', U')
    vb, c, rh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r, hh = rh // H, rh % H
    chunk = rh * NC + c
    t0, v0 = c * C, vb * BV
    DT: tl.constexpr = q.dtype.element_ty
    do = (scale * _load_tile(dO, r, t0, hh, Tp, H, V, C, BV, v0)).to(DT)
    du = tl.dot(tl.trans(_load_tile(P_qb, r, t0, hh, Tp, H, C, C, C).to(DT)), do, input_precision=PREC)
    _store_rows(dU2, du, chunk, 2 * C, V, 0, C, BV, v0)
    dvv = tl.dot(tl.trans(_load_tile(P_qk, r, t0, hh, Tp, H, C, C, C).to(DT)), do, input_precision=PREC)
    _store_rows(dU2, dvv, chunk, 2 * C, V, C, C, BV, v0)
    u = _rows(U2, chunk, 2 * C, V, 0, C, BV, v0).to(tl.float32)
    for k0 in range(0, K, BK):
        e_b = _e_tile(E, c, rh, NC, K, V, k0, v0, BK, BV, DT)
        wk = _rows(Wk2, chunk, 2 * C, K, 0, C, BK, k0).to(DT)
        u -= tl.dot(wk, e_b, input_precision=PREC)
        q_dec = _q_decayed(q, G, r, t0, hh, Tp, H, K, C, BK, k0)
        de = tl.dot(tl.trans(q_dec.to(DT)), do, input_precision=PREC) \
            - tl.dot(tl.trans(wk), du.to(DT), input_precision=PREC)
        kk = k0 + tl.arange(0, BK)
        vv = v0 + tl.arange(0, BV)
        tl.store(dE + chunk * K * V + kk[:, None] * V + vv[None, :], de, mask=(kk < K)[:, None] & (vv < V)[None, :])
    _store_rows(u_out, u, chunk, C, V, 0, C, BV, v0)


@triton.jit
def _bwd_scores_kernel(v, u, dO, dP_qb, dP_qk, scale, Tp, H, V, NC, C: tl.constexpr, BV: tl.constexpr,
                       PREC: tl.constexpr):
    # grid (NC, R * H): dP_qb = dO' uᵀ, dP_qk = dO' Vᵀ of one chunk, over V blocks (the scores' backward kernel reads
    # only j <= i)
    c, rh = tl.program_id(0), tl.program_id(1)
    r, hh = rh // H, rh % H
    chunk = rh * NC + c
    t0 = c * C
    DT: tl.constexpr = v.dtype.element_ty
    d_pqb = tl.zeros([C, C], dtype=tl.float32)
    d_pqk = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        do = (scale * _load_tile(dO, r, t0, hh, Tp, H, V, C, BV, v0)).to(DT)
        d_pqb += tl.dot(do, tl.trans(_rows(u, chunk, C, V, 0, C, BV, v0).to(DT)), input_precision=PREC)
        d_pqk += tl.dot(do, tl.trans(_load_raw(v, r, t0, hh, Tp, H, V, C, BV, v0)), input_precision=PREC)
    _store_tile(dP_qb, d_pqb, r, t0, hh, Tp, H, C, C, C)
    _store_tile(dP_qk, d_pqk, r, t0, hh, Tp, H, C, C, C)


@triton.jit
def _bwd_q_kernel(G, E, dO, dU2, dq, dWk2, scale, Tp, H, K, V, NC, C: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, PREC: tl.constexpr):
    # grid (cdiv(K, BK), NC, R * H): dq = exp G ⊙ dO' Eᵀ (the part through q ⊙ exp G; the decay's is q ⊙ dq, added
    # by the launcher) and dWk' = [−dU0 Eᵀ; 0] for one chunk and K block, over V blocks
    kb, c, rh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r, hh = rh // H, rh % H
    chunk = rh * NC + c
    t0, k0 = c * C, kb * BK
    DT: tl.constexpr = dO.dtype.element_ty
    dqe = tl.zeros([C, BK], dtype=tl.float32)
    dwk = tl.zeros([C, BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        e_t = tl.trans(_e_tile(E, c, rh, NC, K, V, k0, v0, BK, BV, DT))
        dqe += tl.dot((scale * _load_tile(dO, r, t0, hh, Tp, H, V, C, BV, v0)).to(DT), e_t, input_precision=PREC)
        dwk -= tl.dot(_rows(dU2, chunk, 2 * C, V, 0, C, BV, v0).to(DT), e_t, input_precision=PREC)
    _store_tile(dq, tl.exp(_load_tile(G, r, t0, hh, Tp, H, K, C, BK, k0)) * dqe, r, t0, hh, Tp, H, K, C, BK, k0)
    _store_rows(dWk2, dwk, chunk, 2 * C, K, 0, C, BK, k0)
    _store_rows(dWk2, tl.zeros([C, BK], dtype=tl.float32), chunk, 2 * C, K, C, C, BK, k0)


@triton.jit
def _store_strict_grad(dS, value, r, c, hh, Tp, H, C: tl.constexpr):
    # the gradient of A [C, C] (A[i] = S[i − 1]) as S's: row i of value to row i − 1 of dS, i >= 1, j < i only
    # (row C − 1 of dS is zero-filled by the launcher)
    ii = tl.arange(0, C)
    src = c * C + tl.where(ii >= 1, ii - 1, 0)
    ptrs = dS + ((r.to(tl.int64) * Tp + src.to(tl.int64)) * H + hh) * C
    tl.store(ptrs[:, None] + ii[None, :], value, mask=(ii >= 1)[:, None] & (ii[:, None] > ii[None, :]))


@triton.jit
def _a_exclusive(a, G, g, r, t0, hh, Tp, H, K, k0, C: tl.constexpr, BK: tl.constexpr):
    # (Ã = a ⊙ exp G⁻, exp G⁻) [C, BK] fp32, G⁻ = G − g
    e_ex = tl.exp(_load_tile(G, r, t0, hh, Tp, H, K, C, BK, k0) - _load_tile(g, r, t0, hh, Tp, H, K, C, BK, k0))
    return _load_tile(a, r, t0, hh, Tp, H, K, C, BK, k0) * e_ex, e_ex


@triton.jit
def _bwd_wy_scores_kernel(a, v, G, g, S_ak, Tinv, dWk2, dU2, dS_ak, dTinv, Tp, H, K, V, NC, C: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    # grid (NC, R * H): from dU0 (of U0 = T A_ak V) and dWk0 (of Wk0 = −T Ã) of one chunk, with M = dU0 Vᵀ (a sum
    # over V blocks): dA_ak = Tᵀ M, stored as the source's dS_a⁺k, and dT = M A_akᵀ − dWk0 Ãᵀ (a sum over K
    # blocks) stored for `_bwd_wy_ab_kernel` (in one kernel with it, sm_80 spilled 112 B per thread)
    c, rh = tl.program_id(0), tl.program_id(1)
    r, hh = rh // H, rh % H
    chunk = rh * NC + c
    t0 = c * C
    DT: tl.constexpr = v.dtype.element_ty
    M = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        M += tl.dot(_rows(dU2, chunk, 2 * C, V, 0, C, BV, v0).to(DT),
                    tl.trans(_load_raw(v, r, t0, hh, Tp, H, V, C, BV, v0)), input_precision=PREC)
    T = _rows(Tinv, chunk, C, C, 0, C, C, 0).to(DT)
    _store_strict_grad(dS_ak, tl.dot(tl.trans(T), M.to(DT), input_precision=PREC), r, c, hh, Tp, H, C)
    dT = tl.dot(M.to(DT), tl.trans(_strict_tile(S_ak, r, c, hh, Tp, H, C, 0, 0, C, C).to(DT)), input_precision=PREC)
    for k0 in range(0, K, BK):
        a_ex, _ = _a_exclusive(a, G, g, r, t0, hh, Tp, H, K, k0, C, BK)
        dT -= tl.dot(_rows(dWk2, chunk, 2 * C, K, 0, C, BK, k0).to(DT), tl.trans(a_ex.to(DT)), input_precision=PREC)
    _store_rows(dTinv, dT, chunk, C, C, 0, C, C, 0)


@triton.jit
def _bwd_wy_ab_kernel(Tinv, dTinv, dS_ab, Tp, H, NC, C: tl.constexpr, PREC: tl.constexpr):
    # grid (NC, R * H): dA_ab = Tᵀ dT Tᵀ of one chunk (T = (I − A_ab)^-1), stored as the source's dS_a⁺b
    c, rh = tl.program_id(0), tl.program_id(1)
    chunk = rh * NC + c
    DT: tl.constexpr = dTinv.dtype.element_ty            # the inputs' dtype: the chunk-level products' operands
    T = _rows(Tinv, chunk, C, C, 0, C, C, 0).to(DT)
    dT = _rows(dTinv, chunk, C, C, 0, C, C, 0)
    dA_ab = tl.dot(tl.trans(T), tl.dot(dT, tl.trans(T), input_precision=PREC).to(DT), input_precision=PREC)
    _store_strict_grad(dS_ab, dA_ab, rh // H, c, rh % H, Tp, H, C)


@triton.jit
def _bwd_wy_kernel(a, b, k, v, G, g, S_ak, Tinv, dKd2, dWk2, dU2, ddec, da, db, dk, dv, dG, dG_ex, Tp, H, K, V, NC,
                   C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    # grid (NC, R * H): the input gradients of `_wy_apply_kernel`'s outputs (and of the decay exp(G_C)) for one chunk,
    # from dKd' = [dBd; dKd], dWk' = [dWk0; ·], dU' = [dU0; dV1] and ddec:
    #   dv = dV1 + A_akᵀ Tᵀ dU0,  da = exp G⁻ ⊙ (−Tᵀ dWk0) (dG⁻ = Ã ⊙ the same),  db, dk = exp(G_C − G) ⊙ dBd, dKd
    #   dG_i = −(Bd ⊙ dBd + Kd ⊙ dKd)_i, and row C − 1 adds Σ_i (Bd ⊙ dBd + Kd ⊙ dKd)_i + exp(G_C) ⊙ ddec
    c, rh = tl.program_id(0), tl.program_id(1)
    r, hh = rh // H, rh % H
    chunk = rh * NC + c
    t0 = c * C
    DT: tl.constexpr = v.dtype.element_ty
    cc = tl.arange(0, C)
    T = _rows(Tinv, chunk, C, C, 0, C, C, 0).to(DT)
    A_ak = _strict_tile(S_ak, r, c, hh, Tp, H, C, 0, 0, C, C).to(DT)
    for v0 in range(0, V, BV):
        t_du = tl.dot(tl.trans(T), _rows(dU2, chunk, 2 * C, V, 0, C, BV, v0).to(DT), input_precision=PREC)
        dv_c = _rows(dU2, chunk, 2 * C, V, C, C, BV, v0) + tl.dot(tl.trans(A_ak), t_du.to(DT), input_precision=PREC)
        _store_tile(dv, dv_c, r, t0, hh, Tp, H, V, C, BV, v0)
    for k0 in range(0, K, BK):
        a_ex, e_ex = _a_exclusive(a, G, g, r, t0, hh, Tp, H, K, k0, C, BK)
        d_aex = -tl.dot(tl.trans(T), _rows(dWk2, chunk, 2 * C, K, 0, C, BK, k0).to(DT), input_precision=PREC)
        _store_tile(da, d_aex * e_ex, r, t0, hh, Tp, H, K, C, BK, k0)
        _store_tile(dG_ex, d_aex * a_ex, r, t0, hh, Tp, H, K, C, BK, k0)
        G_c = _load_tile(G, r, t0, hh, Tp, H, K, C, BK, k0)
        G_end = _load_row(G, r, t0 + C - 1, hh, Tp, H, K, BK, k0)
        to_end = tl.exp(G_end[None, :] - G_c)
        d_bd = _rows(dKd2, chunk, 2 * C, K, 0, C, BK, k0)
        d_kd = _rows(dKd2, chunk, 2 * C, K, C, C, BK, k0)
        _store_tile(db, d_bd * to_end, r, t0, hh, Tp, H, K, C, BK, k0)
        _store_tile(dk, d_kd * to_end, r, t0, hh, Tp, H, K, C, BK, k0)
        through = (_load_tile(b, r, t0, hh, Tp, H, K, C, BK, k0) * d_bd
                   + _load_tile(k, r, t0, hh, Tp, H, K, C, BK, k0) * d_kd) * to_end      # Bd ⊙ dBd + Kd ⊙ dKd
        kk = k0 + tl.arange(0, BK)
        end = tl.sum(through, 0) + tl.exp(G_end) * tl.load(ddec + chunk * K + kk, mask=kk < K, other=0.0)
        _store_tile(dG, tl.where(cc[:, None] == C - 1, end[None, :], 0.0) - through, r, t0, hh, Tp, H, K, C, BK, k0)
