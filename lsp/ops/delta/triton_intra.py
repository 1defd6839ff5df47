r"""Triton kernels of the delta rule's per-chunk work, forward and backward: the UT transform, the outputs and their
gradients (the chunk scan between them is `triton_scan.py`; the launches and the backward's order are in
`triton_chunk.py`). Tensors are in the padded chunk layout of `chunk.py`: [R, H, NC, C, D] contiguous, C = 64.

Per chunk, with G the within-chunk cumulative log-decay (0 without g) and beta the write strengths:

    A_ij = beta_i exp(G_i − G_j) (k_i · k_j)  (j < i),          T = (I + A)^-1           `_ut_inverse_kernel`
    U = T (beta ⊙ V),   Wk = T (beta exp(G) ⊙ K),   Kd_j = exp(G_C − G_j) k_j               `_ut_apply_kernel`
    o = scale [ (q ⊙ exp(G)) S_c + P (U − Wk S_c) ],   P_ij = exp(G_i − G_j)(q_i · k_j) (j <= i)   `_out_kernel`

The inverse is formed as fla's solve_tril does: A in 16-row sub-blocks (the 16x16 blocks on and below the
diagonal), each diagonal block (I + A_aa) inverted by forward substitution one row at a time, then the blocks below
the diagonal by the block recurrence T_ab = −T_aa Σ_{b<=m<a} A_am T_mb (m = b uses T_bb). Everything in the inverse
is fp32 (fp64 for fp64 inputs) with input_precision="ieee": T multiplies every write of the chunk. The chunk-level
products ([64, *] dots, forward and backward) take their operands in the inputs' dtype (16-bit as fla does, T and
the states included), accumulating in fp32; fp32 inputs run them in full precision (PREC).

Backward (the chain rule through the lines above, every exponent <= 0 as in the forward): T's gradient becomes
dA = −Tᵀ dT Tᵀ; a product x_i · y_j scaled by exp(G_i − G_j) sends Σ_j (dX ⊙ X)_ij − Σ_j (dX ⊙ X)_ji to dG_i.

Grouped value heads: every kernel runs per value head (R·HV programs per chunk) and reads q/k head j // G
(`_group_chunk`, GROUPS = G); the backward writes dq, dk per value head, summed over each group in torch.

A gate per key channel (KEY=True, KDA): g is then the cumulative log-decay G [.., C, K] itself; the exp(G) factors
are per channel (`_key_decay`), and the pair products A and P, which no longer factor into q kᵀ times one decay
matrix, are formed beforehand by the linear op's 16-row kernels and read here (triton_key.py).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows(X, chunk, C: tl.constexpr, W, r0, BR: tl.constexpr, BW: tl.constexpr, w0):
    # [BR, BW] tile (rows r0.., columns w0..) of chunk `chunk` of X: [.., C, W], raw dtype, zero outside W
    rr = r0 + tl.arange(0, BR)
    ww = w0 + tl.arange(0, BW)
    return tl.load(X + chunk * C * W + rr[:, None] * W + ww[None, :], mask=(ww < W)[None, :], other=0.0)


@triton.jit
def _store_rows(X, value, chunk, C: tl.constexpr, W, r0, BR: tl.constexpr, BW: tl.constexpr, w0):
    rr = r0 + tl.arange(0, BR)
    ww = w0 + tl.arange(0, BW)
    tl.store(X + chunk * C * W + rr[:, None] * W + ww[None, :], value.to(X.dtype.element_ty),
             mask=(ww < W)[None, :])


@triton.jit
def _state_rows(S, chunk, K, V, k0, BK: tl.constexpr, BV: tl.constexpr, v0):
    # [BK, BV] block (rows k0.., columns v0..) of state `chunk` of S: [.., K, V], zero outside
    kk = k0 + tl.arange(0, BK)
    vv = v0 + tl.arange(0, BV)
    return tl.load(S + chunk * K * V + kk[:, None] * V + vv[None, :], mask=(kk < K)[:, None] & (vv < V)[None, :],
                   other=0.0)


@triton.jit
def _group_chunk(chunk, NC, GROUPS: tl.constexpr):
    # the q/k chunk that value-head chunk `chunk` reads (grouped value heads: value head j reads q/k head j // G):
    # chunk = (r·HV + j)·NC + c  ->  (r·H + j // G)·NC + c, since r·HV + j = G·(r·H + j // G) + j % G
    if GROUPS == 1:
        return chunk
    else:
        return (chunk // (NC * GROUPS)) * NC + chunk % NC


@triton.jit
def _cum_decay(g, chunk, C: tl.constexpr, r0, BR: tl.constexpr, ACC: tl.constexpr, HAS_G: tl.constexpr):
    # G of rows r0..r0+BR: Σ_{t<=i} g_t within the chunk, one masked [BR, C] sum (no store-then-load between threads)
    if HAS_G:
        rr = r0 + tl.arange(0, BR)
        cols = tl.arange(0, C)
        gg = tl.load(g + chunk * C + cols).to(ACC)
        return tl.sum(tl.where(cols[None, :] <= rr[:, None], gg[None, :], 0.0), 1)
    return tl.zeros([BR], dtype=ACC)


@triton.jit
def _scores(k, beta, g, Akk, chunk, qk, K, C: tl.constexpr, a, b, BS: tl.constexpr, BK: tl.constexpr,
            ACC: tl.constexpr, HAS_G: tl.constexpr, KEY: tl.constexpr):
    # A_ab: [BS, BS] block (rows of sub-block a, columns of b <= a) of A = beta_i exp(G_i - G_j) k_i·k_j, j < i;
    # a gate per key (KEY): A = beta_i Akk_ij, the decayed key scores Akk [.., C, C] formed beforehand
    ii = a * BS + tl.arange(0, BS)
    jj = b * BS + tl.arange(0, BS)
    beta_a = tl.load(beta + chunk * C + ii).to(ACC)
    if KEY:
        acc = _rows(Akk, chunk, C, C, a * BS, BS, BS, b * BS).to(ACC)
    else:
        acc = tl.zeros([BS, BS], dtype=ACC)
        for k0 in range(0, K, BK):
            k_a = _rows(k, qk, C, K, a * BS, BS, BK, k0)
            k_b = _rows(k, qk, C, K, b * BS, BS, BK, k0)
            acc += tl.dot(k_a, tl.trans(k_b), out_dtype=ACC, input_precision="ieee")
        expo = _cum_decay(g, chunk, C, a * BS, BS, ACC, HAS_G)[:, None] - _cum_decay(g, chunk, C, b * BS, BS, ACC,
                                                                                   HAS_G)[None, :]
        acc = acc * tl.exp(expo)
    return tl.where(ii[:, None] > jj[None, :], beta_a[:, None] * acc, 0.0)


@triton.jit
def _inverse_diag(A, BS: tl.constexpr):
    # (I + A)^-1 for a strictly lower [BS, BS] A: x_i = -A_i - Σ_{j<i} A_ij x_j, one row at a time (rows j < i are
    # final when row i is formed; rows > i still hold -A and meet zeros of row i)
    rows = tl.arange(0, BS)
    X = -A
    for i in range(1, BS):
        x_i = tl.sum(tl.where(rows[:, None] == i, X, 0.0), 0)
        x_i = x_i + tl.sum(x_i[:, None] * X, 0)
        X = tl.where(rows[:, None] == i, x_i[None, :], X)
    return X + tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, out_dtype=a.dtype, input_precision="ieee")


@triton.jit
def _store_block_row(Tinv, chunk, C: tl.constexpr, BS: tl.constexpr, a, x0, x1, x2, x3):
    # block row a of the [C, C] inverse, as four [BS, BS] blocks (zeros above the diagonal)
    _store_rows(Tinv, x0, chunk, C, C, a * BS, BS, BS, 0)
    _store_rows(Tinv, x1, chunk, C, C, a * BS, BS, BS, BS)
    _store_rows(Tinv, x2, chunk, C, C, a * BS, BS, BS, 2 * BS)
    _store_rows(Tinv, x3, chunk, C, C, a * BS, BS, BS, 3 * BS)


@triton.jit
def _store_block_inverse(Tinv, chunk, C: tl.constexpr, BS: tl.constexpr, ACC: tl.constexpr, t00, t11, t22, t33,
                         a10, a20, a21, a30, a31, a32):
    # (I + A)^-1 of a unit lower block-triangular [C, C] = 4 x 4 blocks of [BS, BS], from the inverses tii of its
    # diagonal blocks and its blocks aij below them, by forward substitution; stored as chunk `chunk` of Tinv
    t10 = -_mm(t11, _mm(a10, t00))
    t21 = -_mm(t22, _mm(a21, t11))
    t20 = -_mm(t22, _mm(a20, t00) + _mm(a21, t10))
    t32 = -_mm(t33, _mm(a32, t22))
    t31 = -_mm(t33, _mm(a31, t11) + _mm(a32, t21))
    t30 = -_mm(t33, _mm(a30, t00) + _mm(a31, t10) + _mm(a32, t20))
    zero = tl.zeros([BS, BS], dtype=ACC)
    _store_block_row(Tinv, chunk, C, BS, 0, t00, zero, zero, zero)
    _store_block_row(Tinv, chunk, C, BS, 1, t10, t11, zero, zero)
    _store_block_row(Tinv, chunk, C, BS, 2, t20, t21, t22, zero)
    _store_block_row(Tinv, chunk, C, BS, 3, t30, t31, t32, t33)


@triton.jit
def _ut_inverse_kernel(k, beta, g, Akk, Tinv, K, C: tl.constexpr, GROUPS: tl.constexpr, BS: tl.constexpr,
                       BK: tl.constexpr, HAS_G: tl.constexpr, KEY: tl.constexpr):
    # grid (NC, R * H): Tinv[chunk] = (I + A)^-1 [C, C] for C = 4 BS (block rows 0..3); Akk read with KEY only
    ACC: tl.constexpr = Tinv.dtype.element_ty
    chunk = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    qk = _group_chunk(chunk, tl.num_programs(0), GROUPS)
    t00 = _inverse_diag(_scores(k, beta, g, Akk, chunk, qk, K, C, 0, 0, BS, BK, ACC, HAS_G, KEY), BS)
    t11 = _inverse_diag(_scores(k, beta, g, Akk, chunk, qk, K, C, 1, 1, BS, BK, ACC, HAS_G, KEY), BS)
    t22 = _inverse_diag(_scores(k, beta, g, Akk, chunk, qk, K, C, 2, 2, BS, BK, ACC, HAS_G, KEY), BS)
    t33 = _inverse_diag(_scores(k, beta, g, Akk, chunk, qk, K, C, 3, 3, BS, BK, ACC, HAS_G, KEY), BS)
    a10 = _scores(k, beta, g, Akk, chunk, qk, K, C, 1, 0, BS, BK, ACC, HAS_G, KEY)
    a21 = _scores(k, beta, g, Akk, chunk, qk, K, C, 2, 1, BS, BK, ACC, HAS_G, KEY)
    a32 = _scores(k, beta, g, Akk, chunk, qk, K, C, 3, 2, BS, BK, ACC, HAS_G, KEY)
    a20 = _scores(k, beta, g, Akk, chunk, qk, K, C, 2, 0, BS, BK, ACC, HAS_G, KEY)
    a31 = _scores(k, beta, g, Akk, chunk, qk, K, C, 3, 1, BS, BK, ACC, HAS_G, KEY)
    a30 = _scores(k, beta, g, Akk, chunk, qk, K, C, 3, 0, BS, BK, ACC, HAS_G, KEY)
    _store_block_inverse(Tinv, chunk, C, BS, ACC, t00, t11, t22, t33, a10, a20, a21, a30, a31, a32)


@triton.jit
def _key_decay(g, G, chunk, C: tl.constexpr, K, BD: tl.constexpr, d0, ACC: tl.constexpr, KEY: tl.constexpr):
    # (exp(G), exp(G_C - G)) as factors of a [C, BD] key tile (columns d0..): per key [C, BD] from the cumulative
    # log-decay g [.., C, K] (KEY), else [C, 1] from the per-head G [C] (every exponent <= 0)
    if KEY:
        Gt = _rows(g, chunk, C, K, 0, C, BD, d0).to(ACC)
        G_end = tl.sum(tl.where((tl.arange(0, C) == C - 1)[:, None], Gt, 0.0), 0)
        return tl.exp(Gt), tl.exp(G_end[None, :] - Gt)
    else:
        G_end = tl.sum(tl.where(tl.arange(0, C) == C - 1, G, 0.0), 0)
        return tl.exp(G)[:, None], tl.exp(G_end - G)[:, None]


@triton.jit
def _ut_apply_kernel(k, v, beta, g, Tinv, U, Wk, Kd, K, V, C: tl.constexpr, GROUPS: tl.constexpr, BD: tl.constexpr,
                     HAS_G: tl.constexpr, KEY: tl.constexpr, PREC: tl.constexpr):
    # grid (NC, R * H): U = T (beta ⊙ V), Wk = T (beta exp(G) ⊙ K), Kd = exp(G_C - G) ⊙ K, in BD-column blocks;
    # [C, C] x [C, BD] dots with T in the inputs' dtype (fp32 accumulation), as fla's recompute_w_u. KEY: g is the
    # cumulative log-decay per key [.., C, K]
    ACC: tl.constexpr = U.dtype.element_ty
    DT: tl.constexpr = k.dtype.element_ty
    chunk = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    qk = _group_chunk(chunk, tl.num_programs(0), GROUPS)
    cc = tl.arange(0, C)
    T = _rows(Tinv, chunk, C, C, 0, C, C, 0).to(DT)
    b = tl.load(beta + chunk * C + cc).to(ACC)
    G = _cum_decay(g, chunk, C, 0, C, ACC, HAS_G and not KEY)
    for d0 in range(0, V, BD):
        bv = (b[:, None] * _rows(v, chunk, C, V, 0, C, BD, d0).to(ACC)).to(DT)
        _store_rows(U, tl.dot(T, bv, out_dtype=ACC, input_precision=PREC), chunk, C, V, 0, C, BD, d0)
    for d0 in range(0, K, BD):
        k_t = _rows(k, qk, C, K, 0, C, BD, d0).to(ACC)
        e_start, e_end = _key_decay(g, G, chunk, C, K, BD, d0, ACC, KEY)
        bk = (b[:, None] * e_start * k_t).to(DT)
        _store_rows(Wk, tl.dot(T, bk, out_dtype=ACC, input_precision=PREC), chunk, C, K, 0, C, BD, d0)
        _store_rows(Kd, e_end * k_t, chunk, C, K, 0, C, BD, d0)


@triton.jit
def _dot(a, b, DT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    # a chunk-level product: operands in the inputs' dtype (16-bit as given), accumulation in ACC
    return tl.dot(a.to(DT), b.to(DT), out_dtype=ACC, input_precision=PREC)


@triton.jit
def _pair_decay(G, C: tl.constexpr, STRICT: tl.constexpr):
    # [C, C] exp(G_i - G_j) on j < i (STRICT) or j <= i, zero elsewhere (every kept exponent is <= 0)
    cc = tl.arange(0, C)
    keep = cc[:, None] > cc[None, :] if STRICT else cc[:, None] >= cc[None, :]
    return tl.exp(tl.where(keep, G[:, None] - G[None, :], float("-inf")))


@triton.jit
def _out_kernel(q, k, g, Pk, U, Wk, S, o, scale, K, V, C: tl.constexpr, GROUPS: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, HAS_G: tl.constexpr, KEY: tl.constexpr, PREC: tl.constexpr):
    # grid (cdiv(V, BV), NC, R * H): o = scale [ (q ⊙ exp(G)) S_c + P (U - Wk S_c) ] for one chunk and V block;
    # S: [R, H, NC, K, V] entering states (fp32), products over K in BK blocks. KEY: g is the cumulative log-decay
    # per key [.., C, K] and P is read from Pk [.., C, C] (decayed and masked beforehand)
    ACC: tl.constexpr = U.dtype.element_ty
    DT: tl.constexpr = q.dtype.element_ty
    v0 = tl.program_id(0) * BV
    chunk = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    qk = _group_chunk(chunk, tl.num_programs(1), GROUPS)
    G = _cum_decay(g, chunk, C, 0, C, ACC, HAS_G and not KEY)
    P = tl.zeros([C, C], dtype=ACC)
    qS = tl.zeros([C, BV], dtype=ACC)
    W = _rows(U, chunk, C, V, 0, C, BV, v0).to(ACC)
    for k0 in range(0, K, BK):   # one pass over K for P, q S and Wk S (q read once)
        q_t = _rows(q, qk, C, K, 0, C, BK, k0)
        s_t = _state_rows(S, chunk, K, V, k0, BK, BV, v0)
        if not KEY:
            P += _dot(q_t, tl.trans(_rows(k, qk, C, K, 0, C, BK, k0)), DT, ACC, PREC)
        qS += _dot(q_t.to(ACC) * _key_decay(g, G, chunk, C, K, BK, k0, ACC, KEY)[0], s_t, DT, ACC, PREC)
        W -= _dot(_rows(Wk, chunk, C, K, 0, C, BK, k0), s_t, DT, ACC, PREC)
    if KEY:
        P = _rows(Pk, chunk, C, C, 0, C, C, 0).to(ACC)
    else:
        P = P * _pair_decay(G, C, False)
    out = qS + _dot(P, W, DT, ACC, PREC)
    _store_rows(o, scale * out, chunk, C, V, 0, C, BV, v0)


@triton.jit
def _scores_qk(q, k, qk, K, C: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr,
               PREC: tl.constexpr):
    # [C, C] q kᵀ of one chunk, over K blocks (no decay, no mask)
    acc = tl.zeros([C, C], dtype=ACC)
    for k0 in range(0, K, BK):
        acc += _dot(_rows(q, qk, C, K, 0, C, BK, k0), tl.trans(_rows(k, qk, C, K, 0, C, BK, k0)), DT, ACC, PREC)
    return acc


@triton.jit
def _bwd_out_kernel(q, k, g, Pk, Wk, dO, dUo, dE, scale, K, V, C: tl.constexpr, GROUPS: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, HAS_G: tl.constexpr, KEY: tl.constexpr, PREC: tl.constexpr):
    # grid (cdiv(V, BV), NC, R * H): the output's direct gradients of one chunk and V block,
    #   dUo = scale Pᵀ dO [C, BV],   dE = scale (q ⊙ exp(G))ᵀ dO − Wkᵀ dUo [K, BV] (the entering state's)
    # (KEY: g and Pk as in `_out_kernel`)
    ACC: tl.constexpr = dUo.dtype.element_ty
    DT: tl.constexpr = q.dtype.element_ty
    v0 = tl.program_id(0) * BV
    chunk = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    qk = _group_chunk(chunk, tl.num_programs(1), GROUPS)
    G = _cum_decay(g, chunk, C, 0, C, ACC, HAS_G and not KEY)
    if KEY:
        P = _rows(Pk, chunk, C, C, 0, C, C, 0).to(ACC)
    else:
        P = _scores_qk(q, k, qk, K, C, BK, DT, ACC, PREC) * _pair_decay(G, C, False)
    do = _rows(dO, chunk, C, V, 0, C, BV, v0).to(ACC)
    du = scale * _dot(tl.trans(P), do, DT, ACC, PREC)
    _store_rows(dUo, du, chunk, C, V, 0, C, BV, v0)
    for k0 in range(0, K, BK):
        qg = _rows(q, qk, C, K, 0, C, BK, k0).to(ACC) * _key_decay(g, G, chunk, C, K, BK, k0, ACC, KEY)[0]
        de = scale * _dot(tl.trans(qg), do, DT, ACC, PREC) - _dot(tl.trans(_rows(Wk, chunk, C, K, 0, C, BK, k0)), du,
                                                                  DT, ACC, PREC)
        kk = k0 + tl.arange(0, BK)
        vv = v0 + tl.arange(0, BV)
        tl.store(dE + chunk * K * V + kk[:, None] * V + vv[None, :], de, mask=(kk < K)[:, None] & (vv < V)[None, :])


@triton.jit
def _bwd_w_kernel(v, beta, Tinv, U, Wk, Kd, S, dUo, dNext, W, dW, TdW, dv, dbeta, K, V,
                  C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    # grid (NC, R * H), over V blocks: W = U − Wk S_c, dW = dUo + Kd dS (dS: the gradient of the state after the
    # chunk) and Tᵀ dW stored; dv = beta ⊙ Tᵀ dW; dbeta = Σ_V V ⊙ Tᵀ dW (the value part)
    ACC: tl.constexpr = U.dtype.element_ty
    DT: tl.constexpr = v.dtype.element_ty
    chunk = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    cc = tl.arange(0, C)
    T = _rows(Tinv, chunk, C, C, 0, C, C, 0)
    b = tl.load(beta + chunk * C + cc).to(ACC)
    db = tl.zeros([C], dtype=ACC)
    for v0 in range(0, V, BV):
        w = _rows(U, chunk, C, V, 0, C, BV, v0).to(ACC)
        dw = _rows(dUo, chunk, C, V, 0, C, BV, v0).to(ACC)
        for k0 in range(0, K, BK):
            w -= _dot(_rows(Wk, chunk, C, K, 0, C, BK, k0), _state_rows(S, chunk, K, V, k0, BK, BV, v0), DT, ACC, PREC)
            dw += _dot(_rows(Kd, chunk, C, K, 0, C, BK, k0), _state_rows(dNext, chunk, K, V, k0, BK, BV, v0), DT, ACC,
                       PREC)
        _store_rows(W, w, chunk, C, V, 0, C, BV, v0)
        _store_rows(dW, dw, chunk, C, V, 0, C, BV, v0)
        tdw = _dot(tl.trans(T), dw, DT, ACC, PREC)
        _store_rows(TdW, tdw, chunk, C, V, 0, C, BV, v0)
        _store_rows(dv, b[:, None] * tdw, chunk, C, V, 0, C, BV, v0)
        db += tl.sum(_rows(v, chunk, C, V, 0, C, BV, v0).to(ACC) * tdw, 1)
    tl.store(dbeta + chunk * C + cc, db)


@triton.jit
def _state_product(X, S, chunk, K, V, k0, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                   ACC: tl.constexpr, PREC: tl.constexpr):
    # [C, BK] X S_cᵀ (key columns k0..) for X: [.., C, V], over V blocks
    acc = tl.zeros([C, BK], dtype=ACC)
    for v0 in range(0, V, BV):
        acc += _dot(_rows(X, chunk, C, V, 0, C, BV, v0), tl.trans(_state_rows(S, chunk, K, V, k0, BK, BV, v0)), DT,
                    ACC, PREC)
    return acc


@triton.jit
def _bwd_dA_kernel(k, v, beta, g, Akk, Tinv, S, dW, dkk, dbeta, dG, K, V, C: tl.constexpr, GROUPS: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr, KEY: tl.constexpr, PREC: tl.constexpr):
    # grid (NC, R * H): dT = dW (beta ⊙ V)ᵀ + dWk (beta exp(G) ⊙ K)ᵀ with dWk = −dW S_cᵀ, then
    #   dA = −Tᵀ dT Tᵀ (strictly lower), A = beta_i D_ij (k_i · k_j): stores dkk = dAk + dAkᵀ (dAk = dA beta_i D_ij,
    #   the gradient of k kᵀ) and starts dbeta (+= the value part) and dG (= Σ_j (dA ⊙ A)_ij − (dA ⊙ A)_ji).
    #   KEY (A = beta_i Akk_ij, Akk read): stores dkk = dA beta_i, the gradient of Akk (its key and decay gradients
    #   are the 16-row kernels' of the linear op, triton_key.py), and dbeta += Σ_j dA_ij Akk_ij; no dG
    ACC: tl.constexpr = Tinv.dtype.element_ty
    DT: tl.constexpr = k.dtype.element_ty
    chunk = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    qk = _group_chunk(chunk, tl.num_programs(0), GROUPS)
    cc = tl.arange(0, C)
    G = _cum_decay(g, chunk, C, 0, C, ACC, HAS_G and not KEY)
    b = tl.load(beta + chunk * C + cc).to(ACC)
    dt = tl.zeros([C, C], dtype=ACC)
    for v0 in range(0, V, BV):
        bv = b[:, None] * _rows(v, chunk, C, V, 0, C, BV, v0).to(ACC)
        dt += _dot(_rows(dW, chunk, C, V, 0, C, BV, v0), tl.trans(bv), DT, ACC, PREC)
    kk = tl.zeros([C, C], dtype=ACC)
    for k0 in range(0, K, BK):
        k_t = _rows(k, qk, C, K, 0, C, BK, k0)
        if not KEY:
            kk += _dot(k_t, tl.trans(k_t), DT, ACC, PREC)
        dwk = -_state_product(dW, S, chunk, K, V, k0, C, BK, BV, DT, ACC, PREC)
        e_start = _key_decay(g, G, chunk, C, K, BK, k0, ACC, KEY)[0]
        dt += _dot(dwk, tl.trans(b[:, None] * e_start * k_t.to(ACC)), DT, ACC, PREC)
    T = _rows(Tinv, chunk, C, C, 0, C, C, 0)
    dA = -_dot(tl.trans(T), _dot(dt, tl.trans(T), DT, ACC, PREC), DT, ACC, PREC)
    if KEY:
        dA = tl.where(cc[:, None] > cc[None, :], dA, 0.0)
        db = tl.sum(dA * _rows(Akk, chunk, C, C, 0, C, C, 0).to(ACC), 1)
        _store_rows(dkk, dA * b[:, None], chunk, C, C, 0, C, C, 0)
    else:
        dAD = dA * _pair_decay(G, C, True)                                    # zero on j >= i
        N = dAD * kk * b[:, None]                                             # dA ⊙ A
        tl.store(dG + chunk * C + cc, tl.sum(N, 1) - tl.sum(N, 0))
        db = tl.sum(dAD * kk, 1)
        dAk = dAD * b[:, None]
        _store_rows(dkk, dAk + tl.trans(dAk), chunk, C, C, 0, C, C, 0)
    tl.store(dbeta + chunk * C + cc, tl.load(dbeta + chunk * C + cc) + db)


@triton.jit
def _bwd_k_kernel(q, k, beta, g, S, dO, W, TdW, dNext, dkk, dbeta, ddec, dq, dk, dG, scale, K, V,
                  C: tl.constexpr, GROUPS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
                  PREC: tl.constexpr):
    # grid (NC, R * H): dq, dk; dbeta and dG completed. dPt = scale dO Wᵀ ⊙ D (j <= i), the gradient of q kᵀ;
    #   dq = scale exp(G) ⊙ dO S_cᵀ + dPt k,   dk = dkk k + dPtᵀ q + beta exp(G) ⊙ Tᵀ dWk + exp(G_C − G) ⊙ W dSᵀ
    #   with Tᵀ dWk = −(Tᵀ dW) S_cᵀ; dG gets the exp(G) factors of q, Wk's right side, Kd and the decay, and
    #   Σ_j (dPt ⊙ q kᵀ)_ij − (..)_ji
    ACC: tl.constexpr = dG.dtype.element_ty
    DT: tl.constexpr = q.dtype.element_ty
    chunk = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    qk = _group_chunk(chunk, tl.num_programs(0), GROUPS)
    cc = tl.arange(0, C)
    G = _cum_decay(g, chunk, C, 0, C, ACC, HAS_G)
    eG = tl.exp(G)
    G_end = tl.sum(tl.where(cc == C - 1, G, 0.0), 0)
    b = tl.load(beta + chunk * C + cc).to(ACC)
    dp = tl.zeros([C, C], dtype=ACC)
    for v0 in range(0, V, BV):
        dp += _dot(_rows(dO, chunk, C, V, 0, C, BV, v0), tl.trans(_rows(W, chunk, C, V, 0, C, BV, v0)), DT, ACC, PREC)
    dPk = scale * dp * _pair_decay(G, C, False)
    N = dPk * _scores_qk(q, k, qk, K, C, BK, DT, ACC, PREC)
    dg = tl.load(dG + chunk * C + cc) + tl.sum(N, 1) - tl.sum(N, 0)
    db = tl.load(dbeta + chunk * C + cc)
    dkk_c = _rows(dkk, chunk, C, C, 0, C, C, 0)
    end_sum = tl.load(ddec + chunk) * tl.exp(G_end)                           # decay exp(G_C) · its gradient
    for k0 in range(0, K, BK):
        q_t = _rows(q, qk, C, K, 0, C, BK, k0).to(ACC)
        k_t = _rows(k, qk, C, K, 0, C, BK, k0).to(ACC)
        dqs = scale * eG[:, None] * _state_product(dO, S, chunk, K, V, k0, C, BK, BV, DT, ACC, PREC)
        dkd = tl.exp(G_end - G)[:, None] * _state_product(W, dNext, chunk, K, V, k0, C, BK, BV, DT, ACC, PREC)
        tdwk = -_state_product(TdW, S, chunk, K, V, k0, C, BK, BV, DT, ACC, PREC)
        ktd = tl.sum(k_t * tdwk, 1) * eG
        kdx = tl.sum(k_t * dkd, 1)
        db += ktd
        dg += tl.sum(dqs * q_t, 1) + b * ktd - kdx
        end_sum += tl.sum(kdx, 0)
        _store_rows(dq, dqs + _dot(dPk, k_t, DT, ACC, PREC), chunk, C, K, 0, C, BK, k0)
        dk_t = (b * eG)[:, None] * tdwk + dkd + _dot(dkk_c, k_t, DT, ACC, PREC) \
            + _dot(tl.trans(dPk), q_t, DT, ACC, PREC)
        _store_rows(dk, dk_t, chunk, C, K, 0, C, BK, k0)
    tl.store(dbeta + chunk * C + cc, db)
    tl.store(dG + chunk * C + cc, dg + tl.where(cc == C - 1, end_sum, 0.0))
