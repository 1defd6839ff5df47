r"""Triton kernels of the delta rule's chunk scan (the only sequential part of the chunked path), forward and
backward, and their launchers (the torch custom op `lsp::delta_chunk_scan`, custom_ops.py: used by `delta_rule`
with backend="triton" inside `triton_chunk.py`, and by the chunked torch path of sequence parallelism, whose UT
transform and outputs are batched torch ops).

Per (row, head) and chunk c, with S_c the state entering the chunk (columns D split into blocks, which evolve
independently):

    S_{c+1} = Diag(d_c) S_c + Kd_cᵀ (U_c − Wk_c S_c)                 forward, d_c = exp(G_C) or 1

and, with dS the gradient w.r.t. S_{c+1} (dfinal at a sequence end) and dE_c the direct gradient of S_c:

    dU_c  = Kd_c dS,        dKd_c = (U_c − Wk_c S_c) dSᵀ,        dWk_c = −dU_c S_cᵀ,       dd_c = Σ S_c ⊙ dS
    dS_c  = dE_c + Diag(d_c) dS − Wk_cᵀ dU_c                         (dinit[n] = dS_c where sequence n starts)

The decay d_c is one number per chunk and head ([R, H, NC]: no gate, a gate per head) or one per key channel
([R, H, NC, K]: KDA's per-key gate, DPLR's diagonal), scaling the state's rows; its gradient dd_c sums S_c ⊙ dS over
the columns only (per key) or over the whole state (per head).

dKd, dWk and dd sum over D: each D block writes its partial sums, added up in torch. Products run in full fp32
(fp64 for fp64 inputs; input_precision=PREC, not tf32): the scan carries the state over the whole sequence.
Tables [R, NC] int32: reset[r, c] = n >= 0 when sequence n starts at chunk c; end[r, c] = n >= 0 when the state
after chunk c is sequence n's final state; -1 otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _chunk_tile(X, base, C: tl.constexpr, W, BW: tl.constexpr, w0, ACC: tl.constexpr):
    # [C, BW] tile (columns w0..) of chunk `base` of X: [.., C, W]
    cc = tl.arange(0, C)
    ww = w0 + tl.arange(0, BW)
    return tl.load(X + base * C * W + cc[:, None] * W + ww[None, :], mask=(ww < W)[None, :], other=0.0).to(ACC)


@triton.jit
def _state_ptrs(X, base, K, D, BK: tl.constexpr, BD: tl.constexpr, d0):
    # pointers and mask of the [BK, BD] block (columns d0..) of state `base` of X: [.., K, D]
    kk = tl.arange(0, BK)
    dd = d0 + tl.arange(0, BD)
    return X + base * K * D + kk[:, None] * D + dd[None, :], (kk < K)[:, None] & (dd < D)[None, :]


@triton.jit
def _chunk_decay(DEC, chunk, K, BK: tl.constexpr, KEY_DEC: tl.constexpr, ACC: tl.constexpr):
    # the factor of chunk `chunk`'s decay on a [BK, BD] state: [BK, 1] rows of DEC [.., K] (per key) or a scalar
    if KEY_DEC:
        kk = tl.arange(0, BK)
        return tl.load(DEC + chunk * K + kk, mask=kk < K, other=0.0).to(ACC)[:, None]
    else:
        return tl.load(DEC + chunk).to(ACC)


@triton.jit
def _scan_fwd(Kd, Wk, U, DEC, INIT, RESET, END, ENTER, FINAL, NC, H, K, D, C: tl.constexpr, BK: tl.constexpr,
              BD: tl.constexpr, HAS_DEC: tl.constexpr, KEY_DEC: tl.constexpr, HAS_INIT: tl.constexpr,
              PREC: tl.constexpr):
    ACC: tl.constexpr = U.dtype.element_ty  # fp32, or fp64 for fp64 inputs
    rh = tl.program_id(0)
    d0 = tl.program_id(1) * BD
    r = rh // H
    hh = rh % H
    state = tl.zeros([BK, BD], dtype=ACC)
    for c in range(NC):
        n = tl.load(RESET + r * NC + c)
        if n >= 0:
            state = tl.zeros([BK, BD], dtype=ACC)
            if HAS_INIT:
                p, m = _state_ptrs(INIT, n * H + hh, K, D, BK, BD, d0)
                state = tl.load(p, mask=m, other=0.0).to(ACC)
        chunk = rh * NC + c
        p, m = _state_ptrs(ENTER, chunk, K, D, BK, BD, d0)
        tl.store(p, state, mask=m)
        wk = _chunk_tile(Wk, chunk, C, K, BK, 0, ACC)
        kd = _chunk_tile(Kd, chunk, C, K, BK, 0, ACC)
        corrected = _chunk_tile(U, chunk, C, D, BD, d0, ACC) - tl.dot(wk, state, input_precision=PREC)        # [C, BD]
        if HAS_DEC:
            state = state * _chunk_decay(DEC, chunk, K, BK, KEY_DEC, ACC)
        state = state + tl.dot(tl.trans(kd), corrected, input_precision=PREC)
        e = tl.load(END + r * NC + c)
        if e >= 0:
            p, m = _state_ptrs(FINAL, e * H + hh, K, D, BK, BD, d0)
            tl.store(p, state, mask=m)


@triton.jit
def _scan_bwd(Kd, Wk, DEC, RESET, END, DENTER, DFINAL, DNEXT, DINIT, NC, H, K, D, C: tl.constexpr,
              BK: tl.constexpr, BD: tl.constexpr, HAS_DEC: tl.constexpr, KEY_DEC: tl.constexpr, PREC: tl.constexpr):
    # the reverse chain only: stores dS (the gradient w.r.t. the state after every chunk) and dinit; the products
    # that need no chain (dU, dKd, dWk, dd) are batched in torch from dS
    ACC: tl.constexpr = DNEXT.dtype.element_ty
    rh = tl.program_id(0)
    d0 = tl.program_id(1) * BD
    r = rh // H
    hh = rh % H
    dS = tl.zeros([BK, BD], dtype=ACC)
    for i in range(NC):
        c = NC - 1 - i
        chunk = rh * NC + c
        e = tl.load(END + r * NC + c)
        if e >= 0:
            p, m = _state_ptrs(DFINAL, e * H + hh, K, D, BK, BD, d0)
            dS = tl.load(p, mask=m, other=0.0).to(ACC)
        p, m = _state_ptrs(DNEXT, chunk, K, D, BK, BD, d0)
        tl.store(p, dS, mask=m)
        dU = tl.dot(_chunk_tile(Kd, chunk, C, K, BK, 0, ACC), dS, input_precision=PREC)           # [C, BD]
        p, m = _state_ptrs(DENTER, chunk, K, D, BK, BD, d0)
        dS_in = tl.load(p, mask=m, other=0.0).to(ACC) - tl.dot(tl.trans(_chunk_tile(Wk, chunk, C, K, BK, 0, ACC)),
                                                               dU, input_precision=PREC)
        if HAS_DEC:
            dS = dS_in + _chunk_decay(DEC, chunk, K, BK, KEY_DEC, ACC) * dS
        else:
            dS = dS_in + dS
        n = tl.load(RESET + r * NC + c)
        if n >= 0:
            p, m = _state_ptrs(DINIT, n * H + hh, K, D, BK, BD, d0)
            tl.store(p, dS, mask=m)


def _blocks(K: int, D: int) -> tuple[int, int]:
    # the whole key axis in one block (M mixes all of it); columns in blocks of at most 32 (register pressure), 16
    # at K = 128+: there the forward scan with a decay per key channel and an initial state spilled 208 B per thread
    # on sm_80 at 32 columns (tests/ops/test_triton_sm90.py::test_every_dplr_kernel_compiles_without_spills)
    BK = max(16, triton.next_power_of_2(K))
    return BK, max(16, min(32 if BK < 128 else 16, triton.next_power_of_2(D)))


def _warps(K: int) -> int:
    return 8


def precision(input_dtype: torch.dtype) -> str:
    """Products in full precision for fp32 / fp64 inputs; tf32 tensor cores for bf16 / fp16 inputs, whose own
    rounding (2^-8, 2^-11) is already coarser than tf32's (2^-11) — the choice of the linear-attention kernels."""
    return "ieee" if input_dtype in (torch.float32, torch.float64) else "tf32"


def scan_backward(Kd, Wk, dec, reset, end, d_enter, d_final, has_dec: bool, prec: str):
    """The reverse chain: (d_next [R, H, NC, K, D], the gradient of the state after every chunk; dinit [N, H, K, D]).

    Kd, Wk: [R, H, NC, C, K] contiguous; dec: [R, H, NC] or [R, H, NC, K] contiguous (any when not has_dec);
    d_enter: [R, H, NC, K, D], the direct gradient of every entering state; d_final: [N, H, K, D].
    """
    R, H, NC, C, K = Kd.shape
    D = d_enter.shape[-1]
    BK, BD = _blocks(K, D)
    warps = _warps(K)
    if BK > 64:  # K = 128: 8 warps on columns of 32 spill 4 B per thread without decay (sm_90a, bf16); 4 on 16: none
        BD, warps = 16, 4
    d_next = torch.empty_like(d_enter)
    dinit = d_final.clone()   # sequences that start nowhere (empty) pass their final-state gradient straight on
    _scan_bwd[(R * H, triton.cdiv(D, BD))](Kd, Wk, dec, reset, end, d_enter, d_final, d_next, dinit, NC, H, K, D,
                                           C=C, BK=BK, BD=BD, HAS_DEC=has_dec, KEY_DEC=has_dec and dec.dim() == 4,
                                           PREC=prec, num_warps=warps)
    return d_next, dinit


def scan_forward(Kd, Wk, U, decay, init, reset, end, n_seq: int, prec: str):
    """entering [R, H, NC, K, D], final [N, H, K, D] = the chunk scan of `chunk.chunk_scan`, in one kernel.

    Kd, Wk: [R, H, NC, C, K]; U: [R, H, NC, C, D]; decay: [R, H, NC] (per head), [R, H, NC, K] (per key channel) or
    None; init: [N, H, K, D] or None.
    """
    R, H, NC, C, K = Kd.shape
    D = U.shape[-1]
    Kd, Wk, U = Kd.contiguous(), Wk.contiguous(), U.contiguous()
    dec = decay.contiguous() if decay is not None else U.new_empty(0)
    init_c = init.contiguous() if init is not None else U.new_empty(0)
    enter = U.new_empty(R, H, NC, K, D)
    final = init_c.clone() if init is not None else U.new_zeros(n_seq, H, K, D)   # empty sequences keep init
    BK, BD = _blocks(K, D)
    _scan_fwd[(R * H, triton.cdiv(D, BD))](Kd, Wk, U, dec, init_c, reset, end, enter, final, NC, H, K, D, C=C,
                                           BK=BK, BD=BD, HAS_DEC=decay is not None, KEY_DEC=dec.dim() == 4,
                                           HAS_INIT=init is not None, PREC=prec, num_warps=_warps(K))
    return enter, final


def scan_grads(Kd, Wk, U, decay, enter, reset, end, d_enter, d_final, prec: str):
    """(dKd, dWk, dU, ddecay or None, dinit [N, H, K, D]) of `scan_forward` from what it keeps (its inputs and the
    entering states; d_enter, d_final None: zero): the reverse chain in one kernel, the products it feeds batched."""
    Kd, Wk, U = Kd.contiguous(), Wk.contiguous(), U.contiguous()
    dec = decay.contiguous() if decay is not None else U.new_empty(0)
    d_enter = torch.zeros_like(enter) if d_enter is None else d_enter.contiguous()
    d_final = d_final.contiguous()
    d_next, dinit = scan_backward(Kd, Wk, dec, reset, end, d_enter, d_final, decay is not None, prec)
    dU = Kd @ d_next                                                     # [R, H, NC, C, D]
    dKd = (U - Wk @ enter) @ d_next.transpose(-1, -2)
    dWk = -dU @ enter.transpose(-1, -2)
    ddec = None if decay is None else (enter * d_next).sum((-1, -2) if decay.dim() == 3 else -1)
    return dKd, dWk, dU, ddec, dinit
