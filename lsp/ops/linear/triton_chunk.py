"""Triton backend of `lsp.ops.linear_attention`: chunked forward and backward (kernels in `triton_kernels.py` and
`triton_intra.py`).

Same math as `chunk.py` (chunks of C = 64 tokens, G the within-chunk cumulative log-decay, S the entering state):

    forward   S_next = exp(G_C) ⊙ S + Σ_j (k_j ⊙ exp(G_C - G_j))ᵀ v_j                 (state pass, over chunks)
              o_i    = scale [ Σ_{j<=i} (q_i ⊙ exp(G_i - G_j)) · k_j v_j + (q_i ⊙ exp(G_i)) S ]
    backward  dS     = exp(G_C) ⊙ dS_next + scale Σ_i (q_i ⊙ exp(G_i))ᵀ dO_i          (reverse pass)

The op is two differentiable pieces, the seam sequence parallelism needs (states, exchange `final`, output):

    h, final = triton_chunk_states(k, v, g4, initial_state, cu_seqlens)   # h_c = state entering chunk c
    o        = triton_chunk_output(q, k, v, g4, h, scale, cu_seqlens)      # o from the given h

Output piece backward: dq, the intra-chunk dk, dv, and dh_c = scale Σ_i (q_i ⊙ exp(G_i))ᵀ dO_i per chunk.
States piece backward: the reverse scan over chunks with dh as its additive input, dA_c = dL/d(state after c),

    dA_c = dfinal (sequence end) or dh_{c+1} + exp(G_C) ⊙ dA_{c+1};   dinit = dh_c + exp(G_C) ⊙ dA_c (start chunk)
    dk_j = exp(G_C - G_j) ⊙ (v_j dA_cᵀ),   dv_j = (k_j ⊙ exp(G_C - G_j)) dA_c                 (inter-chunk part)

The decay gradient is chunk-local in both pieces (G_t = Σ_{s<=t in the chunk} g_s, so dg_t = Σ_{s>=t} dL/dG_s). The
output sees G only through q ⊙ exp(G) and k ⊙ exp(-G); a chunk's state update only through exp(G_C) ⊙ (S + Σ
(k ⊙ exp(-G))ᵀ v). Hence

    output piece   dg_t = Σ_{s >= t in the chunk} (q_s ⊙ dq_s - k_s ⊙ dk_s)
    states piece   dg_t = exp(G_C) ⊙ rowsum(h_c ⊙ dA_c) + Σ_{s < t in the chunk} k_s ⊙ dk_s

then summed to g's shape (over K for [B, T, H], over B, T, K for [H]).

Precision: dot operands stay in the input dtype (bf16 / fp16 on tensor cores) with fp32 accumulation; states,
decays and the decay gradient are fp32. fp32 inputs use exact fp32 dots unless LSP_TRITON_TF32=1 is set in the
environment, the one explicit switch to TF32 (10-bit mantissa operands, ~1e-3 relative error). h is stored in the
input dtype (fp32 for fp32 inputs, bf16 for bf16, as fla does) to halve its memory; the running state is fp32.
fp64 inputs (and T == 0) fall back to the chunked torch path, which accumulates in fp64.

Memory: `triton_linear_attention` saves only q, k, v, g and the initial state for backward and recomputes h there
(one scan launch); the split pieces save h (SP needs it as a tensor between them).

Status: verified against the naive reference under the Triton interpreter (tests/ops/test_triton*.py) and compiled
for sm_90a offline (registers, spills, wgmma: docs/ops.md); not yet run or timed on a GPU.
"""
from __future__ import annotations

import os

import torch
import triton

from . import triton_intra as intra
from . import triton_kernels as kern
from . import triton_tune as tune
from .chunk import chunk_linear_attention
from .layout import ChunkLayout, chunk_layout

CHUNK_SIZE = 64
SUB_BLOCK = 16      # row sub-block of the per-key intra-chunk kernels (as fla's secondary chunking)
# Block sizes and warps: the largest that compile without register spills for sm_90a (ptxas, bf16 and fp16, every
# decay form; tests/ops/test_triton_sm90.py). With 4 warps every chunk-level kernel spilled (up to 932 B per thread).
BLOCK = 64          # K and V block of the chunk-level kernels
SUB_BLOCK_K = 32    # K block of the 16-row per-key kernels (64 spills: 148 B in _intra_dqk_kernel)
# (the chunk-level output kernels' V block, warps and stages are tuned per shape on CUDA: triton_tune.py, whose first
# candidates are these defaults; _dqk_kernel's default V block is 32: 64 spills 8 B with per-key decay)
SCAN_V_BLOCK = 32   # V block of the forward scan (64 spills 64 B with per-key decay, an initial state and the
                    # two-part 16-bit key; 32 gives 250 registers, no spill, still wgmma)
STATE_WARPS = 8     # the scans hold a [64, 64] fp32 state plus [64, 64] k, v tiles
STATE_STAGES = 2    # forward scan: prefetch one chunk ahead; 3 stages (the default) spill 36 B with per-key decay
                    # and no initial state (255 registers; 2 stages: 197, sm_90a ptxas)
CHUNK_WARPS = 8
DG_BLOCK = 32       # K block of the decay-gradient kernel: five [C, BK] fp32 tiles and two cumsums (64 spills 476 B)
TF32_ENV = "LSP_TRITON_TF32"


def _block(d: int, cap: int = BLOCK) -> int:
    # K or V block: the head dim rounded up to a power of two (>= 16, a dot's minimum), at most cap
    return min(max(16, triton.next_power_of_2(d)), cap)


def _tune_key(x: torch.Tensor, V: int, Kg: int) -> tuple:
    # what the best block size / warps / stages of a chunk-level kernel depends on (not T: one program per chunk)
    return (x.shape[-1], V, Kg > 1, x.dtype, x.device)


def _precision(dtype: torch.dtype) -> str:
    # input_precision of tl.dot; only fp32 operands read it
    return "tf32" if dtype == torch.float32 and os.environ.get(TF32_ENV) == "1" else "ieee"


def _setup(B: int, T: int, cu_seqlens, device):
    # -> layout (padded chunk layout), number of states (B, or N packed sequences)
    return chunk_layout(B, T, cu_seqlens, CHUNK_SIZE, device), (B if cu_seqlens is None else cu_seqlens.numel() - 1)


def _padded_decay(g4, layout: ChunkLayout, B: int, T: int, H: int, device) -> torch.Tensor:
    # g4: None or broadcastable to [B, T, H, Kg] -> G: [R, Tp, H, Kg or 1] fp32, cumulative inside each chunk
    if g4 is None:
        return torch.zeros(layout.rows, layout.padded_length, H, 1, dtype=torch.float32, device=device)
    g = layout.pad(g4.float().expand(B, T, H, g4.shape[-1]).contiguous())
    R, Tp, _, Kg = g.shape
    return g.view(R, Tp // CHUNK_SIZE, CHUNK_SIZE, H, Kg).cumsum(2).view(R, Tp, H, Kg)


def _prepare(k, g4, initial_state, cu_seqlens):
    # -> layout, number of states, chunk tables (packed only), fp32 initial state or None, padded within-chunk G
    B, T, H, _ = k.shape
    layout, n_states = _setup(B, T, cu_seqlens, k.device)
    init = None if initial_state is None else initial_state.float().contiguous()
    return layout, n_states, layout.chunk_tables(k.device), init, _padded_decay(g4, layout, B, T, H, k.device)


def _padded(layout: ChunkLayout, *xs):
    return [layout.pad(x.contiguous()) for x in xs]


def _to_decay_shape(dgp: torch.Tensor, layout: ChunkLayout, g4: torch.Tensor) -> torch.Tensor:
    # dgp: [R, Tp, H, Kg] fp32 (padded, per token) -> g4's shape and dtype; a reduction over tokens runs in fp64
    dg = layout.unpad(dgp)
    if dg.shape != g4.shape:
        dg = dg.double().sum_to_size(g4.shape)
    return dg.to(g4.dtype)


# -- launchers: the op and the SP pieces share these ------------------------------------------------------------

def _states_fwd(kp, vp, G, init, layout, tables, n_states):
    # kp: [R, Tp, H, K]; vp: [R, Tp, H, V]; G: [R, Tp, H, Kg]; init: [n, H, K, V] fp32 or None
    # -> h: [R, H, NC, K, V] in k's dtype, final: [n, H, K, V] fp32
    R, Tp, H, K = kp.shape
    V, NC, Kg = vp.shape[-1], layout.num_chunks, G.shape[-1]
    h = torch.empty(R, H, NC, K, V, dtype=kp.dtype, device=kp.device)
    final = torch.zeros(n_states, H, K, V, dtype=torch.float32, device=kp.device)
    BK, BV = _block(K), _block(V, SCAN_V_BLOCK)
    kern._fwd_state_kernel[(R * H, triton.cdiv(K, BK), triton.cdiv(V, BV))](
        kp, vp, G, h, init if init is not None else final, final, *(tables or (G, G)), Tp, H, K, V, NC, Kg,
        C=CHUNK_SIZE, BKs=BK, BVs=BV, KEY=Kg > 1, HAS_INIT=init is not None, PREC=_precision(kp.dtype),
        SPLIT=kp.dtype != torch.float32, PACKED=bool(tables), num_warps=STATE_WARPS, num_stages=STATE_STAGES)
    for n in layout.empty:  # an empty sequence hands its initial state straight through
        if init is not None:
            final[n] = init[n]
    return h, final


def _states_bwd(kp, vp, G, h, dh, dfinal, layout, tables, n_states, need_dg, dv_base=None):
    # dh: [R, H, NC, K, V] or None; dfinal: [n, H, K, V] fp32 or None; dv_base: [R, Tp, H, V] fp32 or None (added
    # into dv) -> dk: [R, Tp, H, K], dv: [R, Tp, H, V] (fp32, padded), chunk term of dg (StateDecayTerm or None),
    #    dinit: [n, H, K, V] fp32
    R, Tp, H, K = kp.shape
    V, NC, Kg = vp.shape[-1], layout.num_chunks, G.shape[-1]
    BK, BV = _block(K), _block(V)
    nkb, nvb = triton.cdiv(K, BK), triton.cdiv(V, BV)
    dhn = torch.empty(R, H, NC, K, V, dtype=torch.float32, device=kp.device)
    dinit = torch.zeros(n_states, H, K, V, dtype=torch.float32, device=kp.device)
    NB = nvb if Kg > 1 else nkb * nvb
    dgc = torch.empty(R * H, NC, NB, Kg, dtype=torch.float32, device=kp.device) if need_dg else dinit
    kern._bwd_state_kernel[(R * H, nkb, nvb)](
        dh if dh is not None else dhn, h, G, dhn, dfinal if dfinal is not None else dinit, dinit, dgc,
        *(tables or (G, G)), H, K, V, NC, Kg, C=CHUNK_SIZE, BKs=BK, BVs=BV, KEY=Kg > 1, HAS_DH=dh is not None,
        HAS_DFINAL=dfinal is not None, NEED_DG=need_dg, PACKED=bool(tables), num_warps=STATE_WARPS)
    if dfinal is not None:
        for n in layout.empty:
            dinit[n] = dfinal[n]
    dk = torch.empty(kp.shape, dtype=torch.float32, device=kp.device)
    dv = torch.empty(vp.shape, dtype=torch.float32, device=kp.device)
    tune.launch(kern._state_dkdv_kernel, "_state_dkdv_kernel",
                lambda cfg: (triton.cdiv(K, cfg["BK"]) + triton.cdiv(V, cfg["BV"]), NC, R * H),
                (kp, vp, G, dhn, dk, dv, dv if dv_base is None else dv_base, Tp, H, K, V, NC, Kg),
                dict(C=CHUNK_SIZE, KEY=Kg > 1, PREC=_precision(kp.dtype), HAS_BASE=dv_base is not None),
                _tune_key(kp, V, Kg), dict(BK=BK, BV=BV))
    return dk, dv, ((dk, dgc, NB) if need_dg else None), dinit


def _decay_grad(kp, Kg, out=None, state=None):
    # chunk-local decay gradient (triton_kernels._dg_kernel) of the output piece, out = (qp, dq, dk_o), of the
    # state piece, state = (dk_s, dgc, NB), or of both; with both, dk_o becomes dk_o + dk_s (in place)
    # -> [R, Tp, H, Kg] fp32
    R, Tp, H, K = kp.shape
    qp, dq, dko = out if out is not None else (kp, kp, kp)
    dks, dgc, NB = state if state is not None else (kp, kp, 0)
    dg = torch.empty(R, Tp, H, Kg, dtype=torch.float32, device=kp.device)
    kern._dg_kernel[(1, Tp // CHUNK_SIZE, R * H)](
        qp, dq, kp, dko, dks, dgc, dg, Tp, H, K, Tp // CHUNK_SIZE, NB, C=CHUNK_SIZE, BK=_block(K, DG_BLOCK), KEY=Kg > 1,
        OUT=out is not None, STATE=state is not None, num_warps=CHUNK_WARPS)
    return dg


def _intra_scores(qp, kp, G):
    # per-key decay: A [R, Tp, H, C] fp32, the masked intra-chunk scores (triton_intra._intra_scores_kernel)
    R, Tp, H, K = qp.shape
    A = torch.empty(R, Tp, H, CHUNK_SIZE, dtype=torch.float32, device=qp.device)
    intra._intra_scores_kernel[(CHUNK_SIZE // SUB_BLOCK, Tp // CHUNK_SIZE, R * H)](
        qp, kp, G, A, Tp, H, K, C=CHUNK_SIZE, BT=SUB_BLOCK, BK=_block(K, SUB_BLOCK_K), PREC=_precision(qp.dtype),
        num_warps=CHUNK_WARPS)
    return A


def _output_fwd(qp, kp, vp, G, h, scale, out_dtype):
    # -> o: [R, Tp, H, V] in out_dtype
    R, Tp, H, K = qp.shape
    V, NC, Kg = vp.shape[-1], Tp // CHUNK_SIZE, G.shape[-1]
    A = _intra_scores(qp, kp, G) if Kg > 1 else G
    o = torch.empty(vp.shape, dtype=out_dtype, device=qp.device)
    BK, BV = _block(K), _block(V)
    tune.launch(intra._out_kernel, "_out_kernel", lambda cfg: (triton.cdiv(V, cfg["BV"]), NC, R * H),
                (qp, kp, vp, G, A, h, o, scale, Tp, H, K, V, NC, Kg),
                dict(C=CHUNK_SIZE, BK=BK, KEY=Kg > 1, PREC=_precision(qp.dtype)), _tune_key(qp, V, Kg), dict(BV=BV))
    return o


def _output_bwd(qp, kp, vp, G, h, dop, scale):
    # -> dq, dk (intra-chunk part): [R, Tp, H, K], dv: [R, Tp, H, V] (fp32, padded), dh: [R, H, NC, K, V] in h's
    #    dtype; the decay gradient is `_decay_grad(kp, Kg, out=(qp, dq, dk))`
    R, Tp, H, K = qp.shape
    V, NC, Kg = vp.shape[-1], Tp // CHUNK_SIZE, G.shape[-1]
    BK, BV, prec = _block(K), _block(V), _precision(qp.dtype)
    dh = torch.empty_like(h)
    kern._dh_kernel[(triton.cdiv(K, BK) * triton.cdiv(V, BV), NC, R * H)](
        qp, dop, G, dh, scale, Tp, H, K, V, NC, Kg, C=CHUNK_SIZE, BKs=BK, BVs=BV, KEY=Kg > 1,
        PREC=prec, num_warps=CHUNK_WARPS)
    dq = torch.empty(qp.shape, dtype=torch.float32, device=qp.device)
    dk, dv = torch.empty_like(dq), torch.empty(vp.shape, dtype=torch.float32, device=qp.device)
    dA = torch.empty(R, Tp, H, CHUNK_SIZE, dtype=torch.float32, device=qp.device) if Kg > 1 else dq
    fixed = dict(C=CHUNK_SIZE, BK=BK, KEY=Kg > 1, PREC=prec)
    tune.launch(intra._dqk_kernel, "_dqk_kernel", lambda cfg: (triton.cdiv(K, BK), NC, R * H),
                (qp, kp, vp, G, h, dop, dq, dk, dA, scale, Tp, H, K, V, NC, Kg), fixed, _tune_key(qp, V, Kg),
                dict(BV=BV))
    A = _intra_scores(qp, kp, G) if Kg > 1 else G   # recomputed rather than saved (memory)
    tune.launch(intra._dv_kernel, "_dv_kernel", lambda cfg: (triton.cdiv(V, cfg["BV"]), NC, R * H),
                (qp, kp, G, A, dop, dv, scale, Tp, H, K, V, Kg), fixed, _tune_key(qp, V, Kg), dict(BV=BV))
    if Kg > 1:
        _intra_grads(qp, kp, G, dA, dq, dk)
    return dq, dk, dv, dh


def _intra_grads(qp, kp, G, dA, dq, dk):
    # per-key decay: the gradients of `_intra_scores`' A from dA [R, Tp, H, C] (triton_intra._intra_dqk_kernel):
    # dq [R, Tp, H, K] fp32 += Σ_j dA_ij k_j ⊙ exp(G_i - G_j) (it holds the rest of dq), dk = Σ_i dA_ij q_i ⊙ (..)
    R, Tp, H, K = qp.shape
    intra._intra_dqk_kernel[(CHUNK_SIZE // SUB_BLOCK, Tp // CHUNK_SIZE, R * H)](
        qp, kp, G, dA, dq, dk, Tp, H, K, C=CHUNK_SIZE, BT=SUB_BLOCK, BK=_block(K, SUB_BLOCK_K),
        PREC=_precision(qp.dtype), num_warps=CHUNK_WARPS)


# -- forward and backward of the op and its two pieces (torch custom ops with their autograd: custom_ops.py) ----

def states_forward(k, v, g4, initial_state, cu_seqlens):
    # k: [B, T, H, K]; v: [B, T, H, V]; g4: None or broadcastable to [B, T, H, K]; initial_state: [n, H, K, V]
    # -> h: [R, H, NC, K, V] in k's dtype (state entering every chunk), final: [n, H, K, V] fp32
    layout, n_states, tables, init, G = _prepare(k, g4, initial_state, cu_seqlens)
    return _states_fwd(*_padded(layout, k, v), G, init, layout, tables, n_states)


def states_backward(k, v, g4, kept, cu_seqlens, recompute_h, dh, dfinal, need_dg, init_dtype):
    # kept: h, or the initial state (None for zero) when recompute_h (h is rebuilt with one scan)
    # -> dk, dv in k's / v's dtype, dg in g4's shape (or None), dinit: [n, H, K, V] in init_dtype (or None)
    layout, n_states, tables, _, G = _prepare(k, g4, None, cu_seqlens)
    h = _recompute_h(k, v, G, kept, layout, tables, n_states) if recompute_h else kept
    kp, vp = _padded(layout, k, v)
    dk, dv, term, dinit = _states_bwd(kp, vp, G, h, None if dh is None else dh.contiguous(),
                                      None if dfinal is None else dfinal.float().contiguous(), layout, tables,
                                      n_states, need_dg)
    dg = None if term is None else _decay_grad(kp, G.shape[-1], state=term)
    return (layout.unpad(dk).to(k.dtype), layout.unpad(dv).to(v.dtype),
            None if dg is None else _to_decay_shape(dg, layout, g4),
            None if init_dtype is None else dinit.to(init_dtype))


def _recompute_h(k, v, G, initial_state, layout, tables, n_states):
    # h again from the inputs of the states scan (what the op's backward does instead of keeping h)
    init = None if initial_state is None else initial_state.float().contiguous()
    return _states_fwd(*_padded(layout, k, v), G, init, layout, tables, n_states)[0]


def output_forward(q, k, v, g4, h, scale, cu_seqlens, out_dtype):
    # q, k: [B, T, H, K]; v: [B, T, H, V]; h: [R, H, NC, K, V] -> o: [B, T, H, V] in out_dtype
    B, T, H, _ = q.shape
    layout, _ = _setup(B, T, cu_seqlens, q.device)
    G = _padded_decay(g4, layout, B, T, H, q.device)
    return layout.unpad(_output_fwd(*_padded(layout, q, k, v), G, h.contiguous(), scale, out_dtype))


def output_backward(q, k, v, g4, kept, scale, cu_seqlens, recompute_h, do, need_dg):
    # kept: h, or the initial state h was computed from (None for zero) when recompute_h
    # -> dq, dk, dv in the inputs' dtypes, dg in g4's shape (or None), dh: [R, H, NC, K, V] in h's dtype
    layout, n_states, tables, _, G = _prepare(k, g4, None, cu_seqlens)
    h = _recompute_h(k, v, G, kept, layout, tables, n_states) if recompute_h else kept
    qp, kp, vp = _padded(layout, q, k, v)
    dq, dk, dv, dh = _output_bwd(qp, kp, vp, G, h.contiguous(), layout.pad(do.to(q.dtype).contiguous()), scale)
    dg = _decay_grad(kp, G.shape[-1], out=(qp, dq, dk)) if need_dg else None
    dq, dk, dv = (layout.unpad(x).to(y.dtype) for x, y in ((dq, q), (dk, k), (dv, v)))
    return dq, dk, dv, None if dg is None else _to_decay_shape(dg, layout, g4), dh


def op_forward(q, k, v, g4, initial_state, scale, cu_seqlens):
    # the whole op: the states then the output, with the pieces' launchers -> o [B, T, H, V], final fp32
    layout, n_states, tables, init, G = _prepare(k, g4, initial_state, cu_seqlens)
    qp, kp, vp = _padded(layout, q, k, v)
    h, final = _states_fwd(kp, vp, G, init, layout, tables, n_states)
    return layout.unpad(_output_fwd(qp, kp, vp, G, h, scale, q.dtype)), final


def op_backward(q, k, v, g4, initial_state, scale, cu_seqlens, do, dfinal, need_dg):
    # h is recomputed (one scan) from the kept inputs -> dq, dk, dv, dg (or None), dinit (or None)
    layout, n_states, tables, init, G = _prepare(k, g4, initial_state, cu_seqlens)
    qp, kp, vp = _padded(layout, q, k, v)
    h, _ = _states_fwd(kp, vp, G, init, layout, tables, n_states)
    dq = dk_o = dv_o = dh = None
    if do is not None:
        dq, dk_o, dv_o, dh = _output_bwd(qp, kp, vp, G, h, layout.pad(do.to(q.dtype).contiguous()), scale)
    dfinal = None if dfinal is None else dfinal.float().contiguous()
    # the two pieces' gradients are added inside the kernels: dv in the state dk/dv kernel, dk in the decay
    # gradient kernel (which reads both dk tiles anyway), or by one in-place add when no decay gradient is needed
    dk, dv, term, dinit = _states_bwd(kp, vp, G, h, dh, dfinal, layout, tables, n_states, need_dg, dv_o)
    dg = None
    if need_dg:
        dg = _decay_grad(kp, G.shape[-1], None if do is None else (qp, dq, dk_o), term)
        dk = dk if do is None else dk_o
    elif do is not None:
        dk = dk_o.add_(dk)
    grads = [None if x is None else layout.unpad(x).to(y.dtype) for x, y in ((dq, q), (dk, k), (dv, v))]
    dg = None if dg is None else _to_decay_shape(dg, layout, g4)
    dinit = None if initial_state is None else dinit.to(initial_state.dtype)
    return (*grads, dg, dinit)


def _check_dtype(x: torch.Tensor):
    if x.dtype == torch.float64:
        raise ValueError("the Triton chunk pieces take fp16/bf16/fp32 inputs; fp64 goes to the chunked torch path")


def triton_chunk_states(k, v, g4, initial_state=None, cu_seqlens=None, recompute_h=False):
    """States of the chunked recurrence: (h, final).

    k: [B, T, H, K]; v: [B, T, H, V]; g4: None or broadcastable to [B, T, H, K] ([1, 1, H, 1], [B, T, H, 1],
    [B, T, H, K]); initial_state: None or [B or N, H, K, V]. Returns h: [R, H, NC, K, V] in k's dtype, the state
    entering every chunk of `chunk_layout`'s padded layout (h_c = state after the first c chunks of its sequence),
    and final: [B or N, H, K, V] fp32. Differentiable in k, v, g4, initial_state (through h and final).
    recompute_h: keep the initial state instead of h for backward and rebuild h there with one scan (as the op
    does), so the two pieces together keep what the op keeps."""
    from .custom_ops import chunk_states

    _check_dtype(k)
    return chunk_states(k, v, g4, initial_state, cu_seqlens, recompute_h)


def triton_chunk_output(q, k, v, g4, h, scale, cu_seqlens=None, out_dtype=None, *, recompute_from=None):
    """o_i = scale [ Σ_{j<=i in the chunk} (q_i ⊙ exp(G_i - G_j)) · k_j v_j + (q_i ⊙ exp(G_i)) h_c ], [B, T, H, V]
    in out_dtype (None: q's dtype); h as returned by `triton_chunk_states`. Differentiable in q, k, v, g4, h.
    recompute_from: None, or (initial_state,) that h was computed from: then h is not kept for backward but
    rebuilt there with one scan (see `triton_chunk_states(recompute_h=True)`)."""
    from .custom_ops import chunk_output

    _check_dtype(q)
    return chunk_output(q, k, v, g4, h, float(scale), cu_seqlens, out_dtype or q.dtype, recompute_from)


def triton_linear_attention(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Triton forward and backward; arguments as `lsp.ops.linear_attention` with g already broadcastable to
    [B, T, H, K] ([1, 1, H, 1], [B, T, H, 1] or [B, T, H, K]). Returns (o [B, T, H, V] in q's dtype, final state
    [B or N, H, K, V] fp32 or None): the launchers of `triton_chunk_states` then `triton_chunk_output`, with h
    recomputed in backward. fp64 inputs and empty inputs take the chunked torch path."""
    if q.dtype == torch.float64 or q.shape[1] == 0:
        return chunk_linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    from .custom_ops import linear_attention_op

    o, final = linear_attention_op(q, k, v, g, initial_state, float(scale), cu_seqlens)
    return o, (final if output_final_state else None)
