"""Triton kernels of the chunk states (scan forward and backward) and the helpers every kernel shares; the output
kernels are in `triton_intra.py`, the launchers in `triton_chunk.py`.

All kernels work on the padded chunk layout of `layout.py`: q, k, dq, dk, G: [R, Tp, H, K or 1], v, o, dO:
[R, Tp, H, V], Tp = NC * C, no chunk straddling a sequence boundary. G is the within-chunk cumulative log-decay
(G <= 0, non-increasing inside a chunk), [R, Tp, H, K] for per-key decay (KEY=True) else [R, Tp, H, 1].
States are [R, H, NC, K, V]: h (entering state of every chunk, fp32 or the input dtype), dh (its gradient through
the output) or dhn (the gradient w.r.t. the state after every chunk, fp32).

Reset / end tables [R, NC] int32 (packed sequences only, PACKED=True): reset[r, c] = n >= 0 when a sequence n starts
at chunk c (its state is then initial_state[n] or 0), end[r, c] = n >= 0 when the state after chunk c is sequence
n's final state; -1 otherwise. Without packing row r is sequence r, from chunk 0 to NC - 1: no table is built.

Precision: dot operands are in the input dtype (bf16 / fp16 tensor cores; a decayed operand such as k ⊙ exp(G_C - G)
is formed in fp32 and rounded to the input dtype, as fla does); accumulation, the running states and every decay
are fp32. fp32 inputs use PREC ("ieee" by default, "tf32" only through LSP_TRITON_TF32=1, see triton_chunk.py).
Every exponent is <= 0 (differences G_i - G_j with i >= j, or about a sub-block edge between them).

Grids: state scans (R * H, K blocks, V blocks) loop over chunks; every other kernel is one program per (block,
chunk, row * head), so launches per call do not depend on T.
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
def _load_raw(X, r, t0, hh, Tp, H, D, BT: tl.constexpr, BD: tl.constexpr, d0=0):
    # the [BT, BD] tile in X's own dtype (a dot operand)
    ptrs, mask = _tile_ptrs(X, r, t0, hh, Tp, H, D, BT, BD, d0)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_tile(X, r, t0, hh, Tp, H, D, BT: tl.constexpr, BD: tl.constexpr, d0=0):
    return _load_raw(X, r, t0, hh, Tp, H, D, BT, BD, d0).to(tl.float32)


@triton.jit
def _load_row(X, r, t, hh, Tp, H, D, BD: tl.constexpr, d0=0):
    # row t, columns d0.. of X: [R, Tp, H, D] -> [BD] fp32
    cols = d0 + tl.arange(0, BD)
    return tl.load(X + (r.to(tl.int64) * Tp + t) * H * D + hh * D + cols, mask=cols < D, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(X, value, r, t0, hh, Tp, H, D, BT: tl.constexpr, BD: tl.constexpr, d0=0):
    ptrs, mask = _tile_ptrs(X, r, t0, hh, Tp, H, D, BT, BD, d0)
    tl.store(ptrs, value.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _load_g(G, r, t0, hh, Tp, H, Kg, BT: tl.constexpr, BK: tl.constexpr, KEY: tl.constexpr, k0=0):
    # [BT, BK] (columns k0..) for per-key decay, [BT] otherwise
    if KEY:
        return _load_tile(G, r, t0, hh, Tp, H, Kg, BT, BK, k0)
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
def _load_state(S, rh, c, NC, K, V, k0, v0, BK: tl.constexpr, BV: tl.constexpr):
    sp, sm = _state_ptrs(S, rh, c, NC, K, V, k0, v0, BK, BV)
    return tl.load(sp, mask=sm, other=0.0)


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
def _chunk_last(G, r, t0, hh, Tp, H, Kg, K, k0, C: tl.constexpr, BKs: tl.constexpr, KEY: tl.constexpr):
    # the chunk's total log-decay G_C: [BKs] (per key) or a scalar
    if KEY:
        return _load_row(G, r, t0 + C - 1, hh, Tp, H, Kg, BKs, k0)
    else:
        return tl.load(G + (r.to(tl.int64) * Tp + t0 + C - 1) * H + hh)


@triton.jit
def _chunk_decays(G, r, t0, hh, Tp, H, Kg, K, k0, C: tl.constexpr, BKs: tl.constexpr, KEY: tl.constexpr):
    # -> G_c: [C, BKs] (per key) or [C]; G_last (the chunk's total log-decay): [BKs] or a scalar
    G_c = _load_g(G, r, t0, hh, Tp, H, Kg, C, BKs, KEY, k0)
    return G_c, _chunk_last(G, r, t0, hh, Tp, H, Kg, K, k0, C, BKs, KEY)


@triton.jit
def _causal_decay(G_i, G_j, BT: tl.constexpr):
    # scalar decay on a diagonal tile: [BT_i, BT_j] = exp(G_i - G_j), zero where j > i
    ii = tl.arange(0, BT)
    return tl.exp(tl.where(ii[:, None] >= ii[None, :], G_i[:, None] - G_j[None, :], float("-inf")))


@triton.jit
def _chunk_ids(H):
    # grid (blocks, NC, R * H) -> block, chunk c, r * H + hh, row r, head hh
    blk, c, rh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    return blk, c, rh, rh // H, rh % H


@triton.jit
def _state_or(S, n, hh, H, K, V, k0, v0, current, BKs: tl.constexpr, BVs: tl.constexpr, HAS_S: tl.constexpr):
    # the [BKs, BVs] block of S[n] (or zeros without S) where n >= 0, else current; a branch, not a select, so
    # that S is read only at sequence starts (the select kept a second [64, 64] block live: 4 B spill per thread)
    if n >= 0:
        if HAS_S:
            current = _load_state(S, n * H + hh, 0, 1, K, V, k0, v0, BKs, BVs).to(tl.float32)
        else:
            current = tl.zeros([BKs, BVs], dtype=tl.float32)
    return current


@triton.jit
def _store_state_if(S, n, hh, H, K, V, k0, v0, value, BKs: tl.constexpr, BVs: tl.constexpr):
    # S[n] block = value when n >= 0
    sp, sm = _state_ptrs(S, tl.maximum(n, 0) * H + hh, 0, 1, K, V, k0, v0, BKs, BVs)
    kk = k0 + tl.arange(0, BKs)
    tl.store(sp, value, mask=sm & (kk < tl.where(n >= 0, K, 0))[:, None])


@triton.jit
def _seq_at(table, r, c, NC, edge, PACKED: tl.constexpr):
    # the sequence starting (reset table, edge 0) or ending (end table, edge NC - 1) at chunk c of row r, else -1
    if PACKED:
        return tl.load(table + r * NC + c)
    else:
        return tl.where(c == edge, r, -1)


@triton.jit
def _fwd_state_kernel(k, v, G, h, init, final, reset, end, Tp, H, K, V, NC, Kg,
                      C: tl.constexpr, BKs: tl.constexpr, BVs: tl.constexpr, KEY: tl.constexpr,
                      HAS_INIT: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr, PACKED: tl.constexpr):
    # grid (R * H, cdiv(K, BKs), cdiv(V, BVs)); h[r, h, c] = state entering chunk c; final[n] = state after seq n
    #   S_next = exp(G_C) ⊙ S + (k ⊙ exp(G_C - G))ᵀ v     (S fp32 in registers, h stored in h's dtype)
    # SPLIT (16-bit inputs): the decayed key rounded to 16 bits would cost final states ~3e-3 relative accuracy
    # (measured, bf16); its rounding remainder goes through a second dot (error ~2^-17)
    rh, kb, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r, hh = rh // H, rh % H
    k0, v0 = kb * BKs, vb * BVs
    state = tl.zeros([BKs, BVs], dtype=tl.float32)
    for c in range(NC):
        state = _state_or(init, _seq_at(reset, r, c, NC, 0, PACKED), hh, H, K, V, k0, v0, state, BKs, BVs, HAS_INIT)
        hp, hm = _state_ptrs(h, rh, c, NC, K, V, k0, v0, BKs, BVs)
        tl.store(hp, state.to(h.dtype.element_ty), mask=hm)
        k_c = _load_raw(k, r, c * C, hh, Tp, H, K, C, BKs, k0)
        v_c = _load_raw(v, r, c * C, hh, Tp, H, V, C, BVs, v0)
        G_c, G_last = _chunk_decays(G, r, c * C, hh, Tp, H, Kg, K, k0, C, BKs, KEY)
        k_dec = k_c.to(tl.float32) * _decay_to(G_c, G_last, KEY)
        hi = k_dec.to(k_c.dtype)
        # the dots accumulate into the decayed state in place (wgmma's accumulator): no separate update tile
        state = tl.dot(tl.trans(hi), v_c, state * _state_rows(tl.exp(G_last), KEY), input_precision=PREC)
        if SPLIT:  # k ⊙ exp(G_C - G) = hi + lo in two 16-bit operands: final states keep fp32 accuracy
            state = tl.dot(tl.trans((k_dec - hi.to(tl.float32)).to(k_c.dtype)), v_c, state)
        _store_state_if(final, _seq_at(end, r, c, NC, NC - 1, PACKED), hh, H, K, V, k0, v0, state, BKs, BVs)


@triton.jit
def _bwd_state_kernel(dh, h, G, dhn, dfinal, dinit, dgc, reset, end, H, K, V, NC, Kg,
                      C: tl.constexpr, BKs: tl.constexpr, BVs: tl.constexpr, KEY: tl.constexpr, HAS_DH: tl.constexpr,
                      HAS_DFINAL: tl.constexpr, NEED_DG: tl.constexpr, PACKED: tl.constexpr):
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
        n_end = _seq_at(end, r, c, NC, NC - 1, PACKED)
        dstate = _state_or(dfinal, n_end, hh, H, K, V, k0, v0, dstate, BKs, BVs, HAS_DFINAL)
        hp, hm = _state_ptrs(dhn, rh, c, NC, K, V, k0, v0, BKs, BVs)
        tl.store(hp, dstate, mask=hm)
        G_last = _chunk_last(G, r, c * C, hh, Tp, H, Kg, K, k0, C, BKs, KEY)
        if NEED_DG:
            part = tl.sum(_load_state(h, rh, c, NC, K, V, k0, v0, BKs, BVs).to(tl.float32) * dstate, 1)
            part = part * tl.exp(G_last)
            if KEY:
                kk = k0 + tl.arange(0, BKs)
                tl.store(dgc + ((rh.to(tl.int64) * NC + c) * tl.num_programs(2) + vb) * K + kk, part, mask=kk < K)
            else:
                nb = tl.num_programs(1) * tl.num_programs(2)
                tl.store(dgc + (rh.to(tl.int64) * NC + c) * nb + kb * tl.num_programs(2) + vb, tl.sum(part, 0))
        dstate = dstate * _state_rows(tl.exp(G_last), KEY)
        if HAS_DH:
            dstate += _load_state(dh, rh, c, NC, K, V, k0, v0, BKs, BVs).to(tl.float32)
        _store_state_if(dinit, _seq_at(reset, r, c, NC, 0, PACKED), hh, H, K, V, k0, v0, dstate, BKs, BVs)


@triton.jit
def _dh_kernel(q, do, G, dh, scale, Tp, H, K, V, NC, Kg,
               C: tl.constexpr, BKs: tl.constexpr, BVs: tl.constexpr, KEY: tl.constexpr, PREC: tl.constexpr):
    # grid (cdiv(K, BKs) * cdiv(V, BVs), NC, R * H): dh[c] = dL/d(state entering c) through chunk c's output
    #   = scale Σ_i (q_i ⊙ exp(G_i))ᵀ dO_i
    blk, c, rh, r, hh = _chunk_ids(H)
    nvb = tl.cdiv(V, BVs)
    k0, v0 = (blk // nvb) * BKs, (blk % nvb) * BVs
    q_c = _load_raw(q, r, c * C, hh, Tp, H, K, C, BKs, k0)
    do_c = _load_raw(do, r, c * C, hh, Tp, H, V, C, BVs, v0)
    G_c = _load_g(G, r, c * C, hh, Tp, H, Kg, C, BKs, KEY, k0)
    q_dec = (q_c.to(tl.float32) * _tile_rows(tl.exp(G_c), KEY)).to(q_c.dtype)
    acc = scale * tl.dot(tl.trans(q_dec), do_c, input_precision=PREC)
    hp, hm = _state_ptrs(dh, rh, c, NC, K, V, k0, v0, BKs, BVs)
    tl.store(hp, acc.to(dh.dtype.element_ty), mask=hm)


@triton.jit
def _state_dkdv_kernel(k, v, G, dhn, dk, dv, dv_base, Tp, H, K, V, NC, Kg,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KEY: tl.constexpr, PREC: tl.constexpr,
                       HAS_BASE: tl.constexpr):
    # grid (cdiv(K, BK) + cdiv(V, BV), NC, R * H): the state path of chunk c,
    #   S_next = exp(G_C) ⊙ S + Σ_j (k_j ⊙ exp(G_C - G_j))ᵀ v_j, with dA = dhn[c]:
    #   dk_j = exp(G_C - G_j) ⊙ (v_j dAᵀ)  (first cdiv(K, BK) programs, a K block each, looping over V blocks)
    #   dv_j = (k_j ⊙ exp(G_C - G_j)) dA   (the others, a V block each, looping over K blocks)
    # HAS_BASE: dv = dv_base + that (the output piece's dv added here, not in a pass of its own; dv_base is only
    # read, so a re-run (autotuning) gives the same result). The two branches' accumulators have their own names:
    # one name of shapes [C, BK] and [C, BV] fails to compile when BK != BV
    blk, c, rh, r, hh = _chunk_ids(H)
    nkb = tl.cdiv(K, BK)
    t0 = c * C
    if blk < nkb:
        k0 = blk * BK
        acc_k = tl.zeros([C, BK], dtype=tl.float32)
        for vb in range(tl.cdiv(V, BV)):
            v_c = _load_raw(v, r, t0, hh, Tp, H, V, C, BV, vb * BV)
            dA = _load_state(dhn, rh, c, NC, K, V, k0, vb * BV, BK, BV).to(v_c.dtype)
            acc_k += tl.dot(v_c, tl.trans(dA), input_precision=PREC)
        G_c, G_last = _chunk_decays(G, r, t0, hh, Tp, H, Kg, K, k0, C, BK, KEY)
        _store_tile(dk, acc_k * _decay_to(G_c, G_last, KEY), r, t0, hh, Tp, H, K, C, BK, k0)
    else:
        v0 = (blk - nkb) * BV
        acc_v = tl.zeros([C, BV], dtype=tl.float32)
        for kb in range(nkb):
            k_c = _load_raw(k, r, t0, hh, Tp, H, K, C, BK, kb * BK)
            G_c, G_last = _chunk_decays(G, r, t0, hh, Tp, H, Kg, K, kb * BK, C, BK, KEY)
            k_dec = (k_c.to(tl.float32) * _decay_to(G_c, G_last, KEY)).to(k_c.dtype)
            dA = _load_state(dhn, rh, c, NC, K, V, kb * BK, v0, BK, BV).to(k_c.dtype)
            acc_v += tl.dot(k_dec, dA, input_precision=PREC)
        if HAS_BASE:
            acc_v += _load_tile(dv_base, r, t0, hh, Tp, H, V, C, BV, v0)
        _store_tile(dv, acc_v, r, t0, hh, Tp, H, V, C, BV, v0)


@triton.jit
def _dg_kernel(q, dq, k, dko, dks, dgc, dg, Tp, H, K, NC, NB,
               C: tl.constexpr, BK: tl.constexpr, KEY: tl.constexpr, OUT: tl.constexpr, STATE: tl.constexpr):
    # grid (1, NC, R * H): the decay gradient of one chunk, chunk-local (G_t = Σ_{s<=t in the chunk} g_s), of the
    # output piece (OUT), the state piece (STATE) or the whole op (both):
    #   OUT:   Σ_{s >= t} (q_s ⊙ dq_s - k_s ⊙ dko_s)                   (dko: the output piece's dk)
    #   STATE: Σ_b dgc[rh, c, b] + Σ_{s < t} k_s ⊙ dks_s               (dks: the state piece's dk, dgc: chunk term)
    # Both: dko += dks as well (the op's dk, in place: the tile is read here anyway). The two sums stay separate
    # cumsums: the exclusive one is not formed as total - suffix, which would cancel under strong decay.
    # dg: [R, Tp, H, K] (KEY) or [R, Tp, H, 1]; dgc: [R * H, NC, NB, K or 1]
    _, c, rh, r, hh = _chunk_ids(H)
    t0 = c * C
    rev = tl.zeros([C], dtype=tl.float32)
    exc = tl.zeros([C], dtype=tl.float32)
    for kb in range(tl.cdiv(K, BK)):
        k0 = kb * BK
        k_c = _load_tile(k, r, t0, hh, Tp, H, K, C, BK, k0)
        x = tl.zeros([C, BK], dtype=tl.float32)
        y = tl.zeros([C, BK], dtype=tl.float32)
        if OUT:
            dko_c = _load_tile(dko, r, t0, hh, Tp, H, K, C, BK, k0)
            x = _load_tile(q, r, t0, hh, Tp, H, K, C, BK, k0) * _load_tile(dq, r, t0, hh, Tp, H, K, C, BK, k0)
            x -= k_c * dko_c
        if STATE:
            dks_c = _load_tile(dks, r, t0, hh, Tp, H, K, C, BK, k0)
            y = k_c * dks_c
            if OUT:
                _store_tile(dko, dko_c + dks_c, r, t0, hh, Tp, H, K, C, BK, k0)
        if KEY:
            res = tl.cumsum(x, 0, reverse=True) + tl.cumsum(y, 0) - y
            if STATE:
                res += _chunk_term(dgc, rh, c, NC, NB, K, k0, BK)[None, :]
            _store_tile(dg, res, r, t0, hh, Tp, H, K, C, BK, k0)
        else:
            rev += tl.sum(x, 1)
            exc += tl.sum(y, 1)
    if not KEY:
        res = tl.cumsum(rev, 0, reverse=True) + tl.cumsum(exc, 0) - exc
        if STATE:
            res += tl.sum(_chunk_term(dgc, rh, c, NC, NB, 1, 0, 1), 0)
        _store_tile(dg, res[:, None], r, t0, hh, Tp, H, 1, C, 1)


@triton.jit
def _chunk_term(dgc, rh, c, NC, NB, D, d0, BD: tl.constexpr):
    # Σ_b dgc[rh, c, b, d0:d0+BD] -> [BD]: the state piece's chunk term, summed over its state blocks
    dd = d0 + tl.arange(0, BD)
    term = tl.zeros([BD], dtype=tl.float32)
    for nb in range(NB):
        term += tl.load(dgc + ((rh.to(tl.int64) * NC + c) * NB + nb) * D + dd, mask=dd < D, other=0.0)
    return term
