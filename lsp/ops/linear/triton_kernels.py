"""Triton kernels of the chunked linear attention (forward and backward); the launcher is `triton_chunk.py`.

All kernels work on the padded chunk layout of `layout.py`: q, k, dq, dk, G: [R, Tp, H, K or 1], v, o, dO:
[R, Tp, H, V], Tp = NC * C, no chunk straddling a sequence boundary. G is the within-chunk cumulative log-decay
(G <= 0, non-increasing inside a chunk), [R, Tp, H, K] for per-key decay (KEY=True) else [R, Tp, H, 1].
States are [R, H, NC, K, V] (entering state of every chunk h, its gradient dh through the output, or dhn, the
gradient w.r.t. the state after every chunk).

Reset / end tables [R, NC] int32: reset[r, c] = n >= 0 when a sequence n starts at chunk c (its state is then
initial_state[n] or 0), end[r, c] = n >= 0 when the state after chunk c is sequence n's final state; -1 otherwise.

Every exponent is <= 0: inside a chunk only differences G_i - G_j with i >= j (or about a sub-block edge that lies
between i and j, see `_out_kernel`) are exponentiated. Accumulation is in fp32 whatever the input dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_ptrs(X, r, t0, hh, Tp, H, D, BT: tl.constexpr, BD: tl.constexpr, d0=0):
    # pointers and mask of the [BT, BD] tile of rows t0.., columns d0.. of X: [R, Tp, H, D]
    rows = t0 + tl.arange(0, BT)
    cols = d0 + tl.arange(0, BD)
    base = (r.to(tl.int64) * Tp + rows.to(tl.int64)) * H * D + hh * D
    return X + base[:, None] + cols[None, :], (rows < Tp)[:, None] & (cols < D)[None, :]


@triton.jit
def _load_tile(X, r, t0, hh, Tp, H, D, BT: tl.constexpr, BD: tl.constexpr, d0=0):
    ptrs, mask = _tile_ptrs(X, r, t0, hh, Tp, H, D, BT, BD, d0)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_g(G, r, t0, hh, Tp, H, K, BT: tl.constexpr, BK: tl.constexpr, KEY: tl.constexpr):
    # [BT, BK] for per-key decay, [BT] otherwise
    if KEY:
        return _load_tile(G, r, t0, hh, Tp, H, K, BT, BK)
    else:
        rows = t0 + tl.arange(0, BT)
        return tl.load(G + (r.to(tl.int64) * Tp + rows) * H + hh, mask=rows < Tp, other=0.0)


@triton.jit
def _state_ptrs(S, rh, c, NC, K, V, k0, v0, BK: tl.constexpr, BV: tl.constexpr):
    # pointers and mask of the [BK, BV] block (k0, v0) of S: [R*H (or N*H), NC, K, V]
    kk = k0 + tl.arange(0, BK)
    vv = v0 + tl.arange(0, BV)
    base = (rh.to(tl.int64) * NC + c) * K * V
    return S + base + kk[:, None] * V + vv[None, :], (kk < K)[:, None] & (vv < V)[None, :]


@triton.jit
def _state_rows(x, KEY: tl.constexpr):
    # a chunk decay that scales a [BK, BV] state: per key [BK] -> [BK, 1]; a scalar stays a scalar
    if KEY:
        return x[:, None]
    else:
        return x


@triton.jit
def _tile_rows(x, KEY: tl.constexpr):
    # a decay that scales a [BT, BK] tile: per key it already is [BT, BK]; per token [BT] -> [BT, 1]
    if KEY:
        return x
    else:
        return x[:, None]


@triton.jit
def _decay_to(G, G_end, KEY: tl.constexpr):
    # exp(G_end - G) per row: G [BT, BK] or [BT]; G_end [BK] or scalar -> [BT, BK] or [BT, 1]
    if KEY:
        return tl.exp(G_end[None, :] - G)
    else:
        return _tile_rows(tl.exp(G_end - G), False)


@triton.jit
def _chunk_decays(G, r, t0, hh, Tp, H, Kg, K, k0, C: tl.constexpr, BKs: tl.constexpr, KEY: tl.constexpr):
    # -> G_c: [C, BKs] (per key) or [C]; G_last (the chunk's total log-decay): [BKs] or a scalar
    if KEY:
        G_c = _load_tile(G, r, t0, hh, Tp, H, Kg, C, BKs, k0)
    else:
        G_c = _load_g(G, r, t0, hh, Tp, H, Kg, C, BKs, False)
    return G_c, _chunk_last(G, r, t0, hh, Tp, H, Kg, K, k0, C, BKs, KEY)


@triton.jit
def _chunk_last(G, r, t0, hh, Tp, H, Kg, K, k0, C: tl.constexpr, BKs: tl.constexpr, KEY: tl.constexpr):
    # the chunk's total log-decay G_C: [BKs] (per key) or a scalar
    if KEY:
        kk = k0 + tl.arange(0, BKs)
        return tl.load(G + (r.to(tl.int64) * Tp + t0 + C - 1) * H * Kg + hh * Kg + kk, mask=kk < K, other=0.0)
    else:
        return tl.load(G + (r.to(tl.int64) * Tp + t0 + C - 1) * H + hh)


@triton.jit
def _state_or(S, n, hh, H, K, V, k0, v0, current, BKs: tl.constexpr, BVs: tl.constexpr, HAS_S: tl.constexpr):
    # the [BKs, BVs] block of S[n] (or zeros without S) where n >= 0, else current
    if HAS_S:
        sp, sm = _state_ptrs(S, tl.maximum(n, 0) * H + hh, 0, 1, K, V, k0, v0, BKs, BVs)
        return tl.where(n >= 0, tl.load(sp, mask=sm, other=0.0).to(tl.float32), current)
    else:
        return tl.where(n >= 0, 0.0, current)


@triton.jit
def _store_state_if(S, n, hh, H, K, V, k0, v0, value, BKs: tl.constexpr, BVs: tl.constexpr):
    # S[n] block = value when n >= 0
    sp, sm = _state_ptrs(S, tl.maximum(n, 0) * H + hh, 0, 1, K, V, k0, v0, BKs, BVs)
    kk = k0 + tl.arange(0, BKs)
    tl.store(sp, value, mask=sm & (kk < tl.where(n >= 0, K, 0))[:, None])


@triton.jit
def _fwd_state_kernel(k, v, G, h, init, final, reset, end, Tp, H, K, V, NC, Kg,
                      C: tl.constexpr, BKs: tl.constexpr, BVs: tl.constexpr,
                      KEY: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr):
    # grid (R * H, cdiv(K, BKs), cdiv(V, BVs)); h[r, h, c] = state entering chunk c; final[n] = state after seq n
    rh, kb, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r, hh = rh // H, rh % H
    k0, v0 = kb * BKs, vb * BVs
    state = tl.zeros([BKs, BVs], dtype=tl.float32)
    for c in range(NC):
        state = _state_or(init, tl.load(reset + r * NC + c), hh, H, K, V, k0, v0, state, BKs, BVs, HAS_INIT)
        hp, hm = _state_ptrs(h, rh, c, NC, K, V, k0, v0, BKs, BVs)
        tl.store(hp, state, mask=hm)
        k_c = _load_tile(k, r, c * C, hh, Tp, H, K, C, BKs, k0)
        v_c = _load_tile(v, r, c * C, hh, Tp, H, V, C, BVs, v0)
        G_c, G_last = _chunk_decays(G, r, c * C, hh, Tp, H, Kg, K, k0, C, BKs, KEY)
        state = state * _state_rows(tl.exp(G_last), KEY) + tl.dot(
            tl.trans(k_c * _decay_to(G_c, G_last, KEY)), v_c, input_precision=PREC)
        _store_state_if(final, tl.load(end + r * NC + c), hh, H, K, V, k0, v0, state, BKs, BVs)


@triton.jit
def _bwd_state_kernel(dh, h, G, dhn, dfinal, dinit, dgc, reset, end, H, K, V, NC, Kg,
                      C: tl.constexpr, BKs: tl.constexpr, BVs: tl.constexpr, KEY: tl.constexpr, HAS_DH: tl.constexpr,
                      HAS_DFINAL: tl.constexpr, NEED_DG: tl.constexpr):
    # grid (R * H, cdiv(K, BKs), cdiv(V, BVs)); reverse scan over chunks, with dA_c = dL/d(state after chunk c):
    #   dA_c = dfinal[n] at a sequence end, else dL/d(state entering c + 1) = dh[c+1] + exp(G_C) ⊙ dA_{c+1}
    # writes dhn[c] = dA_c, dinit[n] at a sequence start, and (NEED_DG) the chunk term of the decay gradient
    #   dgc[rh, c, block] = exp(G_C) ⊙ rowsum(h[c] ⊙ dA_c), per key [BKs] (KEY) or summed to a scalar
    rh, kb, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r, hh = rh // H, rh % H
    k0, v0 = kb * BKs, vb * BVs
    Tp = NC * C
    dstate = tl.zeros([BKs, BVs], dtype=tl.float32)
    for i in range(NC):
        c = NC - 1 - i
        dstate = _state_or(dfinal, tl.load(end + r * NC + c), hh, H, K, V, k0, v0, dstate, BKs, BVs, HAS_DFINAL)
        hp, hm = _state_ptrs(dhn, rh, c, NC, K, V, k0, v0, BKs, BVs)
        tl.store(hp, dstate, mask=hm)
        G_last = _chunk_last(G, r, c * C, hh, Tp, H, Kg, K, k0, C, BKs, KEY)
        dec = _state_rows(tl.exp(G_last), KEY)
        if NEED_DG:
            sp, sm = _state_ptrs(h, rh, c, NC, K, V, k0, v0, BKs, BVs)
            part = tl.sum(tl.load(sp, mask=sm, other=0.0).to(tl.float32) * dstate, 1) * tl.exp(G_last)
            if KEY:
                kk = k0 + tl.arange(0, BKs)
                tl.store(dgc + ((rh.to(tl.int64) * NC + c) * tl.num_programs(2) + vb) * K + kk, part, mask=kk < K)
            else:
                nb = tl.num_programs(1) * tl.num_programs(2)
                tl.store(dgc + (rh.to(tl.int64) * NC + c) * nb + kb * tl.num_programs(2) + vb, tl.sum(part, 0))
        dstate = dstate * dec
        if HAS_DH:
            dp, dm = _state_ptrs(dh, rh, c, NC, K, V, k0, v0, BKs, BVs)
            dstate += tl.load(dp, mask=dm, other=0.0).to(tl.float32)
        _store_state_if(dinit, tl.load(reset + r * NC + c), hh, H, K, V, k0, v0, dstate, BKs, BVs)


@triton.jit
def _dh_kernel(q, do, G, dh, scale, Tp, H, K, V, NC, Kg,
               C: tl.constexpr, BKs: tl.constexpr, BVs: tl.constexpr, KEY: tl.constexpr, PREC: tl.constexpr):
    # grid (NC, R * H, cdiv(K, BKs) * cdiv(V, BVs)): dh[c] = dL/d(state entering c) through chunk c's output
    #   = scale Σ_i (q_i ⊙ exp(G_i))ᵀ dO_i
    c, rh, blk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r, hh = rh // H, rh % H
    nvb = tl.cdiv(V, BVs)
    k0, v0 = (blk // nvb) * BKs, (blk % nvb) * BVs
    q_c = _load_tile(q, r, c * C, hh, Tp, H, K, C, BKs, k0)
    do_c = _load_tile(do, r, c * C, hh, Tp, H, V, C, BVs, v0)
    G_c, G_last = _chunk_decays(G, r, c * C, hh, Tp, H, Kg, K, k0, C, BKs, KEY)
    acc = scale * tl.dot(tl.trans(q_c * _tile_rows(tl.exp(G_c), KEY)), do_c, input_precision=PREC)
    hp, hm = _state_ptrs(dh, rh, c, NC, K, V, k0, v0, BKs, BVs)
    tl.store(hp, acc.to(dh.dtype.element_ty), mask=hm)


@triton.jit
def _state_dkdv_kernel(k, v, G, dhn, dk, dv, Tp, H, K, V, NC, Kg,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KEY: tl.constexpr, PREC: tl.constexpr):
    # grid (NC, R * H): the state path of chunk c, S_next = exp(G_C) ⊙ S + Σ_j (k_j ⊙ exp(G_C - G_j))ᵀ v_j, with
    # dA = dhn[c]:  dk_j = exp(G_C - G_j) ⊙ (v_j dAᵀ),  dv_j = (k_j ⊙ exp(G_C - G_j)) dA
    c, rh = tl.program_id(0), tl.program_id(1)
    r, hh = rh // H, rh % H
    k_c = _load_tile(k, r, c * C, hh, Tp, H, K, C, BK)
    v_c = _load_tile(v, r, c * C, hh, Tp, H, V, C, BV)
    G_c, G_last = _chunk_decays(G, r, c * C, hh, Tp, H, Kg, K, 0, C, BK, KEY)
    dec = _decay_to(G_c, G_last, KEY)
    hp, hm = _state_ptrs(dhn, rh, c, NC, K, V, 0, 0, BK, BV)
    dA = tl.load(hp, mask=hm, other=0.0)
    res_k = dec * tl.dot(v_c, tl.trans(dA), input_precision=PREC)
    res_v = tl.dot(k_c * dec, dA, input_precision=PREC)
    kp, km = _tile_ptrs(dk, r, c * C, hh, Tp, H, K, C, BK)
    tl.store(kp, res_k, mask=km)
    vp, vm = _tile_ptrs(dv, r, c * C, hh, Tp, H, V, C, BV)
    tl.store(vp, res_v, mask=vm)


@triton.jit
def _pair_decay(G_i, G_j):
    # scalar decay, query block after key block: [BT_i, BT_j] = exp(G_i - G_j) (every pair has j < i)
    return tl.exp(G_i[:, None] - G_j[None, :])


@triton.jit
def _causal_decay(G_i, G_j, BT: tl.constexpr):
    # scalar decay on a diagonal tile: [BT_i, BT_j] = exp(G_i - G_j), zero where j > i
    ii = tl.arange(0, BT)
    return tl.exp(tl.where(ii[:, None] >= ii[None, :], G_i[:, None] - G_j[None, :], float("-inf")))


@triton.jit
def _diag_decay3(G_i, G_j, BT: tl.constexpr):
    # per-key decay on a diagonal tile: [BT_i, BT_j, BK] = exp(G_i - G_j), zero where j > i
    ii = tl.arange(0, BT)
    causal = (ii[:, None] >= ii[None, :])[:, :, None]
    return tl.exp(tl.where(causal, G_i[:, None, :] - G_j[None, :, :], float("-inf")))


@triton.jit
def _sub_block(H, C: tl.constexpr, BT: tl.constexpr):
    # grid (NC * C // BT, R * H) -> row r, head hh, r * H + hh, chunk c, sub-block b in the chunk, first token t0
    blk, rh = tl.program_id(0), tl.program_id(1)
    return rh // H, rh % H, rh, blk // (C // BT), blk % (C // BT), blk * BT


@triton.jit
def _out_kernel(q, k, v, G, h, o, scale, Tp, H, K, V, NC, Kg,
                C: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                KEY: tl.constexpr, PREC: tl.constexpr):
    # grid (NC * C // BT, R * H, cdiv(V, BV)): rows [t0, t0 + BT) of one chunk, value columns [v0, v0 + BV)
    #   o_i = scale [ Σ_{j<=i} (q_i ⊙ exp(G_i - G_j)) · k_j v_j + (q_i ⊙ exp(G_i)) h_c ]
    # per-key, off-diagonal sub-blocks (j < s <= i, s = first row of the query block):
    #   exp(G_i - G_j) = exp(G_i - G_s) exp(G_s - G_j), both factors <= 1
    r, hh, rh, c, ib, t0 = _sub_block(H, C, BT)
    v0 = tl.program_id(2) * BV
    q_i = _load_tile(q, r, t0, hh, Tp, H, K, BT, BK)
    G_i = _load_g(G, r, t0, hh, Tp, H, Kg, BT, BK, KEY)
    hp, hm = _state_ptrs(h, rh, c, NC, K, V, 0, v0, BK, BV)
    h_c = tl.load(hp, mask=hm, other=0.0)
    acc = tl.dot(q_i * _tile_rows(tl.exp(G_i), KEY), h_c, input_precision=PREC)
    if KEY:
        G_s = tl.sum(tl.where((tl.arange(0, BT) == 0)[:, None], G_i, 0.0), 0)
        q_s = q_i * tl.exp(G_i - G_s[None, :])
    for jb in range(0, ib):
        tj = c * C + jb * BT
        k_j = _load_tile(k, r, tj, hh, Tp, H, K, BT, BK)
        v_j = _load_tile(v, r, tj, hh, Tp, H, V, BT, BV, v0)
        G_j = _load_g(G, r, tj, hh, Tp, H, Kg, BT, BK, KEY)
        if KEY:
            s = tl.dot(q_s, tl.trans(k_j * tl.exp(G_s[None, :] - G_j)), input_precision=PREC)
        else:
            s = tl.dot(q_i, tl.trans(k_j), input_precision=PREC) * _pair_decay(G_i, G_j)
        acc += tl.dot(s, v_j, input_precision=PREC)
    k_i = _load_tile(k, r, t0, hh, Tp, H, K, BT, BK)
    v_i = _load_tile(v, r, t0, hh, Tp, H, V, BT, BV, v0)
    if KEY:
        s = tl.sum(q_i[:, None, :] * k_i[None, :, :] * _diag_decay3(G_i, G_i, BT), 2)
    else:
        s = tl.dot(q_i, tl.trans(k_i), input_precision=PREC) * _causal_decay(G_i, G_i, BT)
    acc += tl.dot(s, v_i, input_precision=PREC)
    op, om = _tile_ptrs(o, r, t0, hh, Tp, H, V, BT, BV, v0)
    tl.store(op, (scale * acc).to(o.dtype.element_ty), mask=om)


@triton.jit
def _dq_kernel(k, v, G, h, do, dq, scale, Tp, H, K, V, NC, Kg,
               C: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               KEY: tl.constexpr, PREC: tl.constexpr):
    # grid (NC * C // BT, R * H); with A_ij = dO_i · v_j (j <= i):
    #   dq_i = scale [ Σ_j A_ij k_j ⊙ exp(G_i - G_j) + exp(G_i) ⊙ (h_c dO_i) ]
    r, hh, rh, c, ib, t0 = _sub_block(H, C, BT)
    do_i = _load_tile(do, r, t0, hh, Tp, H, V, BT, BV)
    G_i = _load_g(G, r, t0, hh, Tp, H, Kg, BT, BK, KEY)
    hp, hm = _state_ptrs(h, rh, c, NC, K, V, 0, 0, BK, BV)
    h_c = tl.load(hp, mask=hm, other=0.0)
    inter = tl.dot(do_i, tl.trans(h_c), input_precision=PREC)
    acc = tl.zeros([BT, BK], dtype=tl.float32)  # decays relative to G_s (per key) or exact (scalar)
    if KEY:
        G_s = tl.sum(tl.where((tl.arange(0, BT) == 0)[:, None], G_i, 0.0), 0)
    for jb in range(0, ib):
        tj = c * C + jb * BT
        k_j = _load_tile(k, r, tj, hh, Tp, H, K, BT, BK)
        v_j = _load_tile(v, r, tj, hh, Tp, H, V, BT, BV)
        G_j = _load_g(G, r, tj, hh, Tp, H, Kg, BT, BK, KEY)
        a = tl.dot(do_i, tl.trans(v_j), input_precision=PREC)
        if KEY:
            acc += tl.dot(a, k_j * tl.exp(G_s[None, :] - G_j), input_precision=PREC)
        else:
            acc += tl.dot(a * _pair_decay(G_i, G_j), k_j, input_precision=PREC)
    k_i = _load_tile(k, r, t0, hh, Tp, H, K, BT, BK)
    v_i = _load_tile(v, r, t0, hh, Tp, H, V, BT, BV)
    a = tl.dot(do_i, tl.trans(v_i), input_precision=PREC)
    if KEY:
        diag = tl.sum(a[:, :, None] * k_i[None, :, :] * _diag_decay3(G_i, G_i, BT), 1)
        acc = acc * tl.exp(G_i - G_s[None, :]) + diag
    else:
        acc += tl.dot(a * _causal_decay(G_i, G_i, BT), k_i, input_precision=PREC)
    dp, dm = _tile_ptrs(dq, r, t0, hh, Tp, H, K, BT, BK)
    tl.store(dp, scale * (acc + inter * _tile_rows(tl.exp(G_i), KEY)), mask=dm)


@triton.jit
def _dkdv_kernel(q, k, v, G, do, dk, dv, scale, Tp, H, K, V, NC, Kg,
                 C: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 KEY: tl.constexpr, PREC: tl.constexpr):
    # grid (NC * C // BT, R * H): key rows [t0, t0 + BT) of the intra-chunk output (the state path is
    # `_state_dkdv_kernel`); with P_ij = Σ_d q_id k_jd exp(G_id - G_jd), i >= j:
    #   dk_j = scale Σ_i (dO_i · v_j) q_i ⊙ exp(G_i - G_j),   dv_j = scale Σ_i P_ij dO_i
    # per-key, off-diagonal (j <= e < i, e = last row of the key block): exp(G_i - G_j) = exp(G_i - G_e) exp(G_e - G_j)
    r, hh, rh, c, jb, t0 = _sub_block(H, C, BT)
    k_j = _load_tile(k, r, t0, hh, Tp, H, K, BT, BK)
    v_j = _load_tile(v, r, t0, hh, Tp, H, V, BT, BV)
    G_j = _load_g(G, r, t0, hh, Tp, H, Kg, BT, BK, KEY)
    last = (tl.arange(0, BT) == BT - 1)
    acc_k = tl.zeros([BT, BK], dtype=tl.float32)
    acc_v = tl.zeros([BT, BV], dtype=tl.float32)
    if KEY:
        G_e = tl.sum(tl.where(last[:, None], G_j, 0.0), 0)
        k_e = k_j * tl.exp(G_e[None, :] - G_j)
    for ib in range(jb + 1, C // BT):
        ti = c * C + ib * BT
        q_i = _load_tile(q, r, ti, hh, Tp, H, K, BT, BK)
        do_i = _load_tile(do, r, ti, hh, Tp, H, V, BT, BV)
        G_i = _load_g(G, r, ti, hh, Tp, H, Kg, BT, BK, KEY)
        a_t = tl.dot(v_j, tl.trans(do_i), input_precision=PREC)              # [j, i]
        if KEY:
            q_e = q_i * tl.exp(G_i - G_e[None, :])
            p_t = tl.dot(k_e, tl.trans(q_e), input_precision=PREC)
            acc_k += tl.dot(a_t, q_e, input_precision=PREC)
        else:
            dec_t = tl.trans(_pair_decay(G_i, G_j))
            p_t = tl.dot(k_j, tl.trans(q_i), input_precision=PREC) * dec_t
            acc_k += tl.dot(a_t * dec_t, q_i, input_precision=PREC)
        acc_v += tl.dot(p_t, do_i, input_precision=PREC)
    q_j = _load_tile(q, r, t0, hh, Tp, H, K, BT, BK)
    do_j = _load_tile(do, r, t0, hh, Tp, H, V, BT, BV)
    a_t = tl.dot(v_j, tl.trans(do_j), input_precision=PREC)
    if KEY:
        e3 = _diag_decay3(G_j, G_j, BT)                                       # [i, j, d]
        p_t = tl.trans(tl.sum(q_j[:, None, :] * k_j[None, :, :] * e3, 2))
        dk_diag = tl.sum(tl.trans(a_t)[:, :, None] * q_j[:, None, :] * e3, 0)
        res_k = scale * (acc_k * tl.exp(G_e[None, :] - G_j) + dk_diag)
    else:
        dec_t = tl.trans(_causal_decay(G_j, G_j, BT))
        p_t = tl.dot(k_j, tl.trans(q_j), input_precision=PREC) * dec_t
        acc_k += tl.dot(a_t * dec_t, q_j, input_precision=PREC)
        res_k = scale * acc_k
    acc_v += tl.dot(p_t, do_j, input_precision=PREC)
    kp, km = _tile_ptrs(dk, r, t0, hh, Tp, H, K, BT, BK)
    tl.store(kp, res_k, mask=km)
    vp, vm = _tile_ptrs(dv, r, t0, hh, Tp, H, V, BT, BV)
    tl.store(vp, scale * acc_v, mask=vm)
