"""Triton kernels of the output piece: o from the entering states h, and its backward (dq, intra-chunk dk, dv).

Per chunk of C = 64 tokens (layout and precision as in `triton_kernels.py`), with A the intra-chunk scores:

    o      = scale [ (q ⊙ exp(G)) h_c + A v ],       A_ij = Σ_d q_id k_jd exp(G_id - G_jd)  (j <= i, else 0)
    dA     = scale · mask(dO vᵀ),   dv = scale Aᵀ dO,   dh_c = scale (q ⊙ exp(G))ᵀ dO  (triton_kernels._dh_kernel)
    dq_i   = scale exp(G_i) ⊙ (dO_i h_cᵀ) + Σ_j dA_ij k_j ⊙ exp(G_i - G_j),   dk_j = Σ_i dA_ij q_i ⊙ exp(G_i - G_j)

Scalar decay (and none): exp(G_i - G_j) is one [C, C] matrix, so every product is a chunk-level [64, *] dot
(`_out_kernel`, `_dqk_kernel`, `_dv_kernel`, wgmma on sm_90). Per-key decay: A and the intra dq, dk do not factor
into one matmul; as in fla they are formed on 16-row sub-blocks (`_intra_scores_kernel`, `_intra_dqk_kernel`):
off the diagonal a factorisation about a sub-block edge (exp(G_i - G_j) = exp(G_i - G_s) exp(G_s - G_j), both
factors <= 1), on the diagonal one key row at a time (no [16, 16, K] product). A is materialised ([R, Tp, H, C]
fp32, recomputed in backward rather than saved), then the chunk-level kernels use it.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import (
    _causal_decay,
    _chunk_ids,
    _load_g,
    _load_raw,
    _load_row,
    _load_state,
    _load_tile,
    _store_tile,
    _tile_rows,
)


@triton.jit
def _causal(C: tl.constexpr):
    # [C, C] mask j <= i
    ii = tl.arange(0, C)
    return ii[:, None] >= ii[None, :]


@triton.jit
def _before(cols, edge):
    # exponent mask of the off-diagonal factor: keep columns before the sub-block edge, -inf (exp = 0) elsewhere
    return tl.where(cols < edge, 0.0, float("-inf"))


@triton.jit
def _intra_scores_kernel(q, k, G, A, Tp, H, K,
                         C: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    # grid (C // BT, NC, R * H), per-key decay: rows [t0, t0 + BT) of A (all C columns of the chunk), s = t0:
    #   j < s:  A_ij = (q_i ⊙ exp(G_i - G_s)) · (k_j ⊙ exp(G_s - G_j))      (one [BT, BK] x [BK, C] dot)
    #   s <= j <= i: Σ_d q_id k_jd exp(G_id - G_jd), one key row j at a time
    ib, c, rh, r, hh = _chunk_ids(H)
    t0, e = c * C + ib * BT, ib * BT
    rows, cols = tl.arange(0, BT), tl.arange(0, C)
    acc = tl.zeros([BT, C], dtype=tl.float32)
    for kb in range(tl.cdiv(K, BK)):
        k0 = kb * BK
        q_i = _load_tile(q, r, t0, hh, Tp, H, K, BT, BK, k0)
        G_i = _load_tile(G, r, t0, hh, Tp, H, K, BT, BK, k0)
        G_s = _load_row(G, r, t0, hh, Tp, H, K, BK, k0)
        k_a = _load_raw(k, r, c * C, hh, Tp, H, K, C, BK, k0)
        G_a = _load_tile(G, r, c * C, hh, Tp, H, K, C, BK, k0)
        k_s = (k_a.to(tl.float32) * tl.exp(G_s[None, :] - G_a + _before(cols, e)[:, None])).to(k_a.dtype)
        q_s = (q_i * tl.exp(G_i - G_s[None, :])).to(k_a.dtype)
        acc += tl.dot(q_s, tl.trans(k_s), input_precision=PREC)
        for jj in range(BT):  # a runtime loop: unrolled, the hoisted row loads spill registers
            k_j = _load_row(k, r, t0 + jj, hh, Tp, H, K, BK, k0)
            G_j = _load_row(G, r, t0 + jj, hh, Tp, H, K, BK, k0)
            ex = tl.exp(tl.where(rows[:, None] >= jj, G_i - G_j[None, :], float("-inf")))
            col = tl.sum(q_i * k_j[None, :] * ex, 1)
            acc += tl.where(cols[None, :] == e + jj, col[:, None], 0.0)
    _store_tile(A, acc, r, t0, hh, Tp, H, C, BT, C)


@triton.jit
def _out_kernel(q, k, v, G, A, h, o, scale, Tp, H, K, V, NC, Kg,
                C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KEY: tl.constexpr, PREC: tl.constexpr):
    # grid (cdiv(V, BV), NC, R * H): o = scale [ (q ⊙ exp(G)) h_c + A v ] for one chunk and V block; A is read
    # (per key) or formed here, A = mask(q kᵀ ⊙ exp(G_i - G_j)) (scalar decay), accumulated over K blocks
    vb, c, rh, r, hh = _chunk_ids(H)
    t0, v0 = c * C, vb * BV
    acc = tl.zeros([C, BV], dtype=tl.float32)
    s = tl.zeros([C, C], dtype=tl.float32)
    for kb in range(tl.cdiv(K, BK)):
        k0 = kb * BK
        q_c = _load_raw(q, r, t0, hh, Tp, H, K, C, BK, k0)
        G_c = _load_g(G, r, t0, hh, Tp, H, Kg, C, BK, KEY, k0)
        h_b = _load_state(h, rh, c, NC, K, V, k0, v0, BK, BV).to(q_c.dtype)
        q_dec = (q_c.to(tl.float32) * _tile_rows(tl.exp(G_c), KEY)).to(q_c.dtype)
        acc += tl.dot(q_dec, h_b, input_precision=PREC)
        if not KEY:
            s += tl.dot(q_c, tl.trans(_load_raw(k, r, t0, hh, Tp, H, K, C, BK, k0)), input_precision=PREC)
    if KEY:
        s = _load_tile(A, r, t0, hh, Tp, H, C, C, C)
    else:
        G_c = _load_g(G, r, t0, hh, Tp, H, Kg, C, BK, False)
        s = s * _causal_decay(G_c, G_c, C)
    v_c = _load_raw(v, r, t0, hh, Tp, H, V, C, BV, v0)
    acc += tl.dot(s.to(v_c.dtype), v_c, input_precision=PREC)
    _store_tile(o, scale * acc, r, t0, hh, Tp, H, V, C, BV, v0)


@triton.jit
def _dqk_kernel(q, k, v, G, h, do, dq, dk, dA, scale, Tp, H, K, V, NC, Kg,
                C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KEY: tl.constexpr, PREC: tl.constexpr):
    # grid (cdiv(K, BK), NC, R * H), one chunk and K block, looping over V blocks:
    #   dq_inter = scale exp(G) ⊙ (dO h_cᵀ),  ds = scale · mask(dO vᵀ)
    # scalar decay: dq = dq_inter + (ds ⊙ D) k, dk = (ds ⊙ D)ᵀ q with D_ij = exp(G_i - G_j) (j <= i)
    # per key: writes dq_inter to dq and ds (once, from the first K block) to dA for `_intra_dqk_kernel`
    kb, c, rh, r, hh = _chunk_ids(H)
    t0, k0 = c * C, kb * BK
    acc = tl.zeros([C, BK], dtype=tl.float32)
    ds = tl.zeros([C, C], dtype=tl.float32)
    for vb in range(tl.cdiv(V, BV)):
        do_c = _load_raw(do, r, t0, hh, Tp, H, V, C, BV, vb * BV)
        h_b = _load_state(h, rh, c, NC, K, V, k0, vb * BV, BK, BV).to(do_c.dtype)
        acc += tl.dot(do_c, tl.trans(h_b), input_precision=PREC)
        if KEY:
            if kb == 0:  # dA is stored once per chunk
                ds += tl.dot(do_c, tl.trans(_load_raw(v, r, t0, hh, Tp, H, V, C, BV, vb * BV)), input_precision=PREC)
        else:
            ds += tl.dot(do_c, tl.trans(_load_raw(v, r, t0, hh, Tp, H, V, C, BV, vb * BV)), input_precision=PREC)
    G_c = _load_g(G, r, t0, hh, Tp, H, Kg, C, BK, KEY, k0)
    acc = scale * acc * _tile_rows(tl.exp(G_c), KEY)
    if KEY:
        _store_tile(dq, acc, r, t0, hh, Tp, H, K, C, BK, k0)
        if kb == 0:
            _store_tile(dA, scale * tl.where(_causal(C), ds, 0.0), r, t0, hh, Tp, H, C, C, C)
    else:
        q_c = _load_raw(q, r, t0, hh, Tp, H, K, C, BK, k0)
        k_c = _load_raw(k, r, t0, hh, Tp, H, K, C, BK, k0)
        ds = (scale * ds * _causal_decay(G_c, G_c, C)).to(q_c.dtype)
        _store_tile(dq, acc + tl.dot(ds, k_c, input_precision=PREC), r, t0, hh, Tp, H, K, C, BK, k0)
        _store_tile(dk, tl.dot(tl.trans(ds), q_c, input_precision=PREC), r, t0, hh, Tp, H, K, C, BK, k0)


@triton.jit
def _dv_kernel(q, k, G, A, do, dv, scale, Tp, H, K, V, Kg,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KEY: tl.constexpr, PREC: tl.constexpr):
    # grid (cdiv(V, BV), NC, R * H): dv = scale Aᵀ dO (A read per key, formed over K blocks for scalar decay)
    vb, c, rh, r, hh = _chunk_ids(H)
    t0, v0 = c * C, vb * BV
    do_c = _load_raw(do, r, t0, hh, Tp, H, V, C, BV, v0)
    if KEY:
        s = _load_tile(A, r, t0, hh, Tp, H, C, C, C)
    else:
        s = tl.zeros([C, C], dtype=tl.float32)
        for kb in range(tl.cdiv(K, BK)):
            q_c = _load_raw(q, r, t0, hh, Tp, H, K, C, BK, kb * BK)
            s += tl.dot(q_c, tl.trans(_load_raw(k, r, t0, hh, Tp, H, K, C, BK, kb * BK)), input_precision=PREC)
        G_c = _load_g(G, r, t0, hh, Tp, H, Kg, C, BK, False)
        s = s * _causal_decay(G_c, G_c, C)
    dv_c = tl.dot(tl.trans(s.to(do_c.dtype)), do_c, input_precision=PREC)
    _store_tile(dv, scale * dv_c, r, t0, hh, Tp, H, V, C, BV, v0)


@triton.jit
def _intra_dqk_kernel(q, k, G, dA, dq, dk, Tp, H, K,
                      C: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    # grid (C // BT, NC, R * H), per-key decay: rows [t0, t0 + BT) (s = first, e = last row) of
    #   dq_i += Σ_{j <= i} dA_ij k_j ⊙ exp(G_i - G_j)    (j < s: exp(G_i - G_s) ⊙ Σ_j dA_ij k_j exp(G_s - G_j))
    #   dk_j  = Σ_{i >= j} dA_ij q_i ⊙ exp(G_i - G_j)    (i > e: exp(G_e - G_j) ⊙ Σ_i dA_ij q_i exp(G_i - G_e))
    # the diagonal sub-block one row at a time; dq already holds the inter-chunk part from `_dqk_kernel`
    ib, c, rh, r, hh = _chunk_ids(H)
    t0, s0 = c * C + ib * BT, ib * BT
    rows, cols = tl.arange(0, BT), tl.arange(0, C)
    dA_rows = _load_tile(dA, r, t0, hh, Tp, H, C, BT, C)                   # dA[i in block, all j]
    dA_cols = _load_tile(dA, r, c * C, hh, Tp, H, C, C, BT, s0)            # dA[all i, j in block]
    for kb in range(tl.cdiv(K, BK)):
        k0 = kb * BK
        G_b = _load_tile(G, r, t0, hh, Tp, H, K, BT, BK, k0)
        G_s = _load_row(G, r, t0, hh, Tp, H, K, BK, k0)
        G_e = _load_row(G, r, t0 + BT - 1, hh, Tp, H, K, BK, k0)
        G_a = _load_tile(G, r, c * C, hh, Tp, H, K, C, BK, k0)
        k_a = _load_raw(k, r, c * C, hh, Tp, H, K, C, BK, k0)
        q_a = _load_raw(q, r, c * C, hh, Tp, H, K, C, BK, k0)
        dt = k_a.dtype
        k_s = (k_a.to(tl.float32) * tl.exp(G_s[None, :] - G_a + _before(cols, s0)[:, None])).to(dt)
        q_e = (q_a.to(tl.float32) * tl.exp(G_a - G_e[None, :] + _before(s0 + BT - 1, cols)[:, None])).to(dt)
        acc_q = tl.exp(G_b - G_s[None, :]) * tl.dot(dA_rows.to(dt), k_s, input_precision=PREC)
        acc_k = tl.exp(G_e[None, :] - G_b) * tl.dot(tl.trans(dA_cols).to(dt), q_e, input_precision=PREC)
        q_b = _load_tile(q, r, t0, hh, Tp, H, K, BT, BK, k0)
        for jj in range(BT):  # a runtime loop: unrolled, the hoisted row loads spill registers
            k_j = _load_row(k, r, t0 + jj, hh, Tp, H, K, BK, k0)
            G_j = _load_row(G, r, t0 + jj, hh, Tp, H, K, BK, k0)
            a_col = tl.sum(tl.where(cols[None, :] == s0 + jj, dA_rows, 0.0), 1)       # dA[i, jj], i in block
            w = a_col[:, None] * tl.exp(tl.where(rows[:, None] >= jj, G_b - G_j[None, :], float("-inf")))
            acc_q += w * k_j[None, :]
            acc_k += tl.where(rows[:, None] == jj, tl.sum(w * q_b, 0)[None, :], 0.0)
        acc_q += _load_tile(dq, r, t0, hh, Tp, H, K, BT, BK, k0)
        _store_tile(dq, acc_q, r, t0, hh, Tp, H, K, BT, BK, k0)
        _store_tile(dk, acc_k, r, t0, hh, Tp, H, K, BT, BK, k0)
