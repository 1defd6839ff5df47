"""Triton backend of `lsp.ops.linear_attention`: chunked forward and backward (kernels in `triton_kernels.py`).

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

Inputs are cast to fp32 inside the kernels; fp32 inputs use exact fp32 dots (no TF32), bf16/fp16 inputs allow TF32.
fp64 inputs (and T == 0) fall back to the chunked torch path, which accumulates in fp64.

Status: verified against the naive reference under the Triton interpreter (tests/ops/test_triton.py) and compiled to
PTX for sm_90 offline; not yet run or timed on a GPU. Known cost: the dq / dk-dv kernels hold full [16, K] and
[16, V] tiles and, for per-key decay, a [16, 16, K] product per diagonal tile; ptxas reports register spills for
K = V >= 128 there. Tiling them over K / V blocks (as the output kernel is over V) is the next step.
"""
from __future__ import annotations

import torch
import triton

from . import triton_kernels as kern
from .checks import seq_bounds
from .chunk import chunk_linear_attention
from .layout import ChunkLayout, make_layout

CHUNK_SIZE = 64
SUB_BLOCK = 16      # query / key sub-block of the output and gradient kernels
STATE_BLOCK = 64    # K and V block of the state passes
STATE_WARPS = 8     # a [64, 64] state plus [64, 64] k and v tiles spill registers with 4 warps (ptxas, sm_90)
OUT_V_BLOCK = 64    # V block of the output kernel (the intra-chunk scores are recomputed per V block)


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _warps(K: int, V: int) -> int:
    # [K, V] state blocks and [16, 16, K] per-key products need the registers of 8 warps past 64 x 64
    return 8 if _block(K) * _block(V) > 64 * 64 else 4


def _tables(layout: ChunkLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
    # -> reset, end: [R, NC] int32 (sequence index starting / ending at each chunk, -1 otherwise)
    R, NC = layout.rows, layout.num_chunks
    reset = torch.full((R, NC), -1, dtype=torch.int32)
    end = torch.full((R, NC), -1, dtype=torch.int32)
    if layout.dst is None:
        reset[:, 0] = torch.arange(R, dtype=torch.int32)
        end[:, NC - 1] = torch.arange(R, dtype=torch.int32)
    else:
        for c, n in layout.resets.items():
            reset[0, c] = n
        for c, ns in layout.ends.items():
            assert len(ns) == 1, "a chunk holds tokens of one sequence only"
            end[0, c] = ns[0]
    return reset.to(device), end.to(device)


def _within_chunk_cumsum(g4, layout: ChunkLayout, B: int, T: int, H: int) -> torch.Tensor:
    # g4: broadcastable to [B, T, H, Kg] -> G: [R, Tp, H, Kg] fp32, cumulative inside each chunk
    g = layout.pad(g4.float().expand(B, T, H, g4.shape[-1]).contiguous())
    R, Tp, _, Kg = g.shape
    return g.view(R, Tp // layout.chunk_size, layout.chunk_size, H, Kg).cumsum(2).view(R, Tp, H, Kg).contiguous()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _setup(B: int, T: int, cu_seqlens, device):
    # -> layout (padded chunk layout), number of states (B, or N packed sequences)
    bounds = seq_bounds(cu_seqlens, B, T)
    return make_layout(B, T, bounds, CHUNK_SIZE, device), (B if bounds is None else len(bounds))


def _padded_decay(g4, layout: ChunkLayout, B: int, T: int, H: int, device) -> torch.Tensor:
    # g4: None or broadcastable to [B, T, H, Kg] -> G: [R, Tp, H, Kg or 1] fp32 (zeros without decay)
    if g4 is None:
        return torch.zeros(layout.rows, layout.padded_length, H, 1, dtype=torch.float32, device=device)
    return _within_chunk_cumsum(g4, layout, B, T, H)


def _state_blocks(K: int, V: int) -> tuple[int, int, int, int]:
    # -> BKs, BVs, number of K blocks, number of V blocks of the state passes
    BKs, BVs = min(_block(K), STATE_BLOCK), min(_block(V), STATE_BLOCK)
    return BKs, BVs, triton.cdiv(K, BKs), triton.cdiv(V, BVs)


def _chunk_scan(x: torch.Tensor, C: int, reverse: bool) -> torch.Tensor:
    # x: [R, Tp, H, D] -> within-chunk cumulative sum; reverse: y_t = Σ_{s >= t}, else exclusive y_t = Σ_{s < t}
    R, Tp, H, D = x.shape
    xc = x.view(R, Tp // C, C, H, D)
    y = xc.flip(2).cumsum(2).flip(2) if reverse else xc.cumsum(2) - xc
    return y.view(R, Tp, H, D)


def _token_decay_grad(a, da, Kg: int) -> torch.Tensor:
    # a, da: [R, Tp, H, K] -> a ⊙ da summed to [R, Tp, H, Kg]; fp64 for scalar / per-head decay, whose gradient
    # sums strongly cancelling terms over every token (fp32 loses ~10x accuracy against autograd, measured T=150)
    dt = torch.float64 if Kg == 1 else torch.float32
    x = a.to(dt) * da.to(dt)
    return x.sum(-1, keepdim=True) if Kg == 1 else x


def _to_decay_shape(dG: torch.Tensor, layout: ChunkLayout, g4: torch.Tensor) -> torch.Tensor:
    # dG: [R, Tp, H, Kg] (padded, per token) -> g4's shape and dtype
    return layout.unpad(dG).sum_to_size(g4.shape).to(g4.dtype)


class _ChunkStates(torch.autograd.Function):
    """h (state entering every chunk, padded chunk layout) and the final state(s); the reverse scan is the backward."""

    @staticmethod
    def forward(ctx, k, v, g4, initial_state, cu_seqlens):
        # k: [B, T, H, K]; v: [B, T, H, V]; g4: None or broadcastable to [B, T, H, K]; initial_state: [n, H, K, V]
        # -> h: [R, H, NC, K, V] fp32, final: [n, H, K, V] fp32
        ctx.set_materialize_grads(False)
        B, T, H, K = k.shape
        V = v.shape[-1]
        layout, n_states = _setup(B, T, cu_seqlens, k.device)
        kp, vp = layout.pad(k.contiguous()), layout.pad(v.contiguous())
        G = _padded_decay(g4, layout, B, T, H, k.device)
        init = None if initial_state is None else initial_state.float().contiguous()
        reset, end = _tables(layout, k.device)
        NC, Kg = layout.num_chunks, G.shape[-1]
        h = torch.empty(layout.rows, H, NC, K, V, dtype=torch.float32, device=k.device)
        final = torch.zeros(n_states, H, K, V, dtype=torch.float32, device=k.device)
        BKs, BVs, nkb, nvb = _state_blocks(K, V)
        kern._fwd_state_kernel[(layout.rows * H, nkb, nvb)](
            kp, vp, G, h, init if init is not None else h, final, reset, end, layout.padded_length, H, K, V, NC, Kg,
            C=CHUNK_SIZE, BKs=BKs, BVs=BVs, KEY=Kg > 1, HAS_INIT=init is not None, PREC=_precision(k.dtype),
            num_warps=STATE_WARPS)
        for n in layout.empty:  # an empty sequence hands its initial state straight through
            if init is not None:
                final[n] = init[n]
        ctx.save_for_backward(k, v, g4, h, reset, end)
        ctx.meta = (layout, n_states, None if initial_state is None else initial_state.dtype)
        return h, final

    @staticmethod
    def backward(ctx, dh, dfinal):
        k, v, g4, h, reset, end = ctx.saved_tensors
        layout, n_states, init_dtype = ctx.meta
        if dh is None and dfinal is None:
            return None, None, None, None, None
        B, T, H, K = k.shape
        V, NC = v.shape[-1], layout.num_chunks
        kp, vp = layout.pad(k.contiguous()), layout.pad(v.contiguous())
        G = _padded_decay(g4, layout, B, T, H, k.device)
        Kg = G.shape[-1]
        need_dg = g4 is not None and ctx.needs_input_grad[2]
        dfinal = None if dfinal is None else dfinal.float().contiguous()
        dh = None if dh is None else dh.contiguous()
        dhn = torch.empty_like(h)
        dinit = torch.zeros(n_states, H, K, V, dtype=torch.float32, device=k.device)
        BKs, BVs, nkb, nvb = _state_blocks(K, V)
        nb = nvb if Kg > 1 else nkb * nvb
        dgc = torch.zeros(layout.rows * H, NC, nb, K if Kg > 1 else 1, dtype=torch.float32, device=k.device)
        kern._bwd_state_kernel[(layout.rows * H, nkb, nvb)](
            dh if dh is not None else h, h, G, dhn, dfinal if dfinal is not None else h, dinit, dgc, reset, end,
            H, K, V, NC, Kg, C=CHUNK_SIZE, BKs=BKs, BVs=BVs, KEY=Kg > 1, HAS_DH=dh is not None,
            HAS_DFINAL=dfinal is not None, NEED_DG=need_dg, num_warps=STATE_WARPS)
        if dfinal is not None:
            for n in layout.empty:
                dinit[n] = dfinal[n]
        dkp = torch.empty(kp.shape, dtype=torch.float32, device=k.device)
        dvp = torch.empty(vp.shape, dtype=torch.float32, device=k.device)
        kern._state_dkdv_kernel[(NC, layout.rows * H)](
            kp, vp, G, dhn, dkp, dvp, layout.padded_length, H, K, V, NC, Kg, C=CHUNK_SIZE, BK=_block(K),
            BV=_block(V), KEY=Kg > 1, PREC=_precision(k.dtype), num_warps=_warps(K, V))
        dg = None
        if need_dg:
            # dg_t = exp(G_C) ⊙ rowsum(h_c ⊙ dA_c) + Σ_{s < t in the chunk} k_s ⊙ dk_s  (see the module docstring)
            R = layout.rows
            chunk_term = dgc.sum(2).view(R, H, NC, 1, -1).permute(0, 2, 3, 1, 4)       # [R, NC, 1, H, Kg]
            dG = _chunk_scan(_token_decay_grad(kp, dkp, Kg), CHUNK_SIZE, reverse=False)
            dG = (dG.view(R, NC, CHUNK_SIZE, H, Kg) + chunk_term.to(dG.dtype)).view(dG.shape)
            dg = _to_decay_shape(dG, layout, g4)
        dk, dv = layout.unpad(dkp).to(k.dtype), layout.unpad(dvp).to(v.dtype)
        return dk, dv, dg, None if init_dtype is None else dinit.to(init_dtype), None


class _ChunkOutput(torch.autograd.Function):
    """The output from the entering states h; the backward yields dq, the intra-chunk dk, dv, dg, and dh."""

    @staticmethod
    def forward(ctx, q, k, v, g4, h, scale, cu_seqlens, out_dtype):
        # q, k: [B, T, H, K]; v: [B, T, H, V]; g4: None or broadcastable to [B, T, H, K]; h: [R, H, NC, K, V]
        # -> o: [B, T, H, V] in out_dtype
        ctx.set_materialize_grads(False)
        B, T, H, K = q.shape
        V = v.shape[-1]
        layout, _ = _setup(B, T, cu_seqlens, q.device)
        qp, kp, vp = (layout.pad(x.contiguous()) for x in (q, k, v))
        G = _padded_decay(g4, layout, B, T, H, q.device)
        h = h.contiguous()
        o = torch.empty(*vp.shape, dtype=out_dtype, device=q.device)
        BVo = min(_block(V), OUT_V_BLOCK)
        Tp, NC, Kg = layout.padded_length, layout.num_chunks, G.shape[-1]
        kern._out_kernel[(Tp // SUB_BLOCK, layout.rows * H, triton.cdiv(V, BVo))](
            qp, kp, vp, G, h, o, scale, Tp, H, K, V, NC, Kg, C=CHUNK_SIZE, BT=SUB_BLOCK, BK=_block(K), BV=BVo,
            KEY=Kg > 1, PREC=_precision(q.dtype), num_warps=_warps(K, BVo))
        ctx.save_for_backward(q, k, v, g4, h)
        ctx.meta = (layout, scale)
        return layout.unpad(o)

    @staticmethod
    def backward(ctx, do):
        q, k, v, g4, h = ctx.saved_tensors
        layout, scale = ctx.meta
        if do is None:
            return (None,) * 8
        B, T, H, K = q.shape
        V, NC, Tp, R = v.shape[-1], layout.num_chunks, layout.padded_length, layout.rows
        qp, kp, vp = (layout.pad(x.contiguous()) for x in (q, k, v))
        dop = layout.pad(do.contiguous())
        G = _padded_decay(g4, layout, B, T, H, q.device)
        Kg, prec = G.shape[-1], _precision(q.dtype)
        BKs, BVs, nkb, nvb = _state_blocks(K, V)
        dh = torch.empty_like(h)
        kern._dh_kernel[(NC, R * H, nkb * nvb)](qp, dop, G, dh, scale, Tp, H, K, V, NC, Kg, C=CHUNK_SIZE,
                                                BKs=BKs, BVs=BVs, KEY=Kg > 1, PREC=prec, num_warps=STATE_WARPS)
        dqp = torch.empty(qp.shape, dtype=torch.float32, device=q.device)
        dkp, dvp = torch.empty_like(dqp), torch.empty(vp.shape, dtype=torch.float32, device=q.device)
        grid = (Tp // SUB_BLOCK, R * H)
        meta = dict(C=CHUNK_SIZE, BT=SUB_BLOCK, BK=_block(K), BV=_block(V), KEY=Kg > 1, PREC=prec,
                    num_warps=_warps(K, V))
        kern._dq_kernel[grid](kp, vp, G, h, dop, dqp, scale, Tp, H, K, V, NC, Kg, **meta)
        kern._dkdv_kernel[grid](qp, kp, vp, G, dop, dkp, dvp, scale, Tp, H, K, V, NC, Kg, **meta)
        dg = None
        if g4 is not None and ctx.needs_input_grad[3]:
            # dg_t = Σ_{s >= t in the chunk} (q_s ⊙ dq_s - k_s ⊙ dk_s)  (see the module docstring)
            dG = _token_decay_grad(qp, dqp, Kg) - _token_decay_grad(kp, dkp, Kg)
            dg = _to_decay_shape(_chunk_scan(dG, CHUNK_SIZE, reverse=True), layout, g4)
        dq, dk, dv = (layout.unpad(x).to(y.dtype) for x, y in ((dqp, q), (dkp, k), (dvp, v)))
        return dq, dk, dv, dg, dh, None, None, None


def _check_dtype(x: torch.Tensor):
    if x.dtype == torch.float64:
        raise ValueError("the Triton chunk pieces take fp16/bf16/fp32 inputs; fp64 goes to the chunked torch path")


def triton_chunk_states(k, v, g4, initial_state=None, cu_seqlens=None):
    """States of the chunked recurrence: (h, final).

    k: [B, T, H, K]; v: [B, T, H, V]; g4: None or broadcastable to [B, T, H, K] ([1, 1, H, 1], [B, T, H, 1],
    [B, T, H, K]); initial_state: None or [B or N, H, K, V]. Returns h: [R, H, NC, K, V] fp32, the state entering
    every chunk of `make_layout`'s padded layout (h_c = state after the first c chunks of its sequence), and
    final: [B or N, H, K, V] fp32. Differentiable in k, v, g4, initial_state (through h and final)."""
    _check_dtype(k)
    return _ChunkStates.apply(k, v, g4, initial_state, cu_seqlens)


def triton_chunk_output(q, k, v, g4, h, scale, cu_seqlens=None, out_dtype=None):
    """o_i = scale [ Σ_{j<=i in the chunk} (q_i ⊙ exp(G_i - G_j)) · k_j v_j + (q_i ⊙ exp(G_i)) h_c ], [B, T, H, V]
    in out_dtype (None: q's dtype); h as returned by `triton_chunk_states`. Differentiable in q, k, v, g4, h."""
    _check_dtype(q)
    return _ChunkOutput.apply(q, k, v, g4, h, float(scale), cu_seqlens, out_dtype or q.dtype)


def triton_linear_attention(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Triton forward and backward; arguments as `lsp.ops.linear_attention` with g already broadcastable to
    [B, T, H, K] ([1, 1, H, 1], [B, T, H, 1] or [B, T, H, K]). Returns (o [B, T, H, V] in q's dtype, final state
    [B or N, H, K, V] fp32 or None): `triton_chunk_states` then `triton_chunk_output`. fp64 inputs and empty inputs
    take the chunked torch path."""
    if q.dtype == torch.float64 or q.shape[1] == 0:
        return chunk_linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    h, final = triton_chunk_states(k, v, g, initial_state, cu_seqlens)
    o = triton_chunk_output(q, k, v, g, h, scale, cu_seqlens)
    return o, (final if output_final_state else None)
