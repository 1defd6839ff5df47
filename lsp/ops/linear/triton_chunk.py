"""Triton backend of `lsp.ops.linear_attention`: chunked forward and backward (kernels in `triton_kernels.py`).

Same math as `chunk.py` (chunks of C = 64 tokens, G the within-chunk cumulative log-decay, S the entering state):

    forward   S_next = exp(G_C) ⊙ S + Σ_j (k_j ⊙ exp(G_C - G_j))ᵀ v_j                 (state pass, over chunks)
              o_i    = scale [ Σ_{j<=i} (q_i ⊙ exp(G_i - G_j)) · k_j v_j + (q_i ⊙ exp(G_i)) S ]
    backward  dS     = exp(G_C) ⊙ dS_next + scale Σ_i (q_i ⊙ exp(G_i))ᵀ dO_i          (reverse pass)
              dq, dk, dv from the intra-chunk scores and the (entering state, state-gradient) of each chunk.

The decay gradient uses an identity instead of a kernel of its own. With B_t = Σ_{s<=t} g_s (from the start of
t's sequence), q̃_t = q_t ⊙ exp(B_t) and k̃_t = k_t ⊙ exp(-B_t), the output only sees q̃ and k̃, and the final state
is exp(B_T) ⊙ (S_0 + Σ k̃ᵀ v), so

    dL/dB_t = q_t ⊙ dq_t - k_t ⊙ dk_t   (+ rowsum(S_final ⊙ dS_final) at a sequence's last token)
    dg_t    = Σ_{s >= t, same sequence} dL/dB_s                                        (reverse cumulative sum)

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


def _forward(qp, kp, vp, G, init, layout, scale, n_states):
    # qp, kp: [R, Tp, H, K]; vp: [R, Tp, H, V]; G: [R, Tp, H, Kg]; init: [n_states, H, K, V] fp32 or None
    # -> o: [R, Tp, H, V] (input dtype), entering states h: [R, H, NC, K, V], final: [n_states, H, K, V] fp32
    R, Tp, H, K = qp.shape
    V, NC, Kg = vp.shape[-1], layout.num_chunks, G.shape[-1]
    reset, end = _tables(layout, qp.device)
    h = torch.empty(R, H, NC, K, V, dtype=torch.float32, device=qp.device)
    final = torch.zeros(n_states, H, K, V, dtype=torch.float32, device=qp.device)
    BKs, BVs = min(_block(K), STATE_BLOCK), min(_block(V), STATE_BLOCK)
    prec = _precision(qp.dtype)
    grid = (R * H, triton.cdiv(K, BKs), triton.cdiv(V, BVs))
    kern._fwd_state_kernel[grid](kp, vp, G, h, init if init is not None else h, final, reset, end,
                                 Tp, H, K, V, NC, Kg, C=CHUNK_SIZE, BKs=BKs, BVs=BVs, KEY=Kg > 1,
                                 HAS_INIT=init is not None, PREC=prec, num_warps=STATE_WARPS)
    o = torch.empty_like(vp)
    BVo = min(_block(V), OUT_V_BLOCK)
    grid = (Tp // SUB_BLOCK, R * H, triton.cdiv(V, BVo))
    kern._out_kernel[grid](qp, kp, vp, G, h, o, scale, Tp, H, K, V, NC, Kg, C=CHUNK_SIZE, BT=SUB_BLOCK,
                           BK=_block(K), BV=BVo, KEY=Kg > 1, PREC=prec, num_warps=_warps(K, BVo))
    return o, h, final, (reset, end)


def _backward(qp, kp, vp, G, h, dop, dfinal, layout, tables, scale, n_states):
    # -> dq, dk: [R, Tp, H, K], dv: [R, Tp, H, V] fp32; dinit: [n_states, H, K, V] fp32
    R, Tp, H, K = qp.shape
    V, NC, Kg = vp.shape[-1], layout.num_chunks, G.shape[-1]
    reset, end = tables
    prec = _precision(qp.dtype)
    dhn = torch.empty_like(h)
    dinit = torch.zeros(n_states, H, K, V, dtype=torch.float32, device=qp.device)
    BKs, BVs = min(_block(K), STATE_BLOCK), min(_block(V), STATE_BLOCK)
    grid = (R * H, triton.cdiv(K, BKs), triton.cdiv(V, BVs))
    kern._bwd_state_kernel[grid](qp, dop, G, dhn, dfinal if dfinal is not None else dhn, dinit, reset, end, scale,
                                 Tp, H, K, V, NC, Kg, C=CHUNK_SIZE, BKs=BKs, BVs=BVs, KEY=Kg > 1,
                                 HAS_DFINAL=dfinal is not None, PREC=prec, num_warps=STATE_WARPS)
    dq = torch.empty(R, Tp, H, K, dtype=torch.float32, device=qp.device)
    dk, dv = torch.empty_like(dq), torch.empty(R, Tp, H, V, dtype=torch.float32, device=qp.device)
    grid = (Tp // SUB_BLOCK, R * H)
    meta = dict(C=CHUNK_SIZE, BT=SUB_BLOCK, BK=_block(K), BV=_block(V), KEY=Kg > 1, PREC=prec, num_warps=_warps(K, V))
    kern._dq_kernel[grid](kp, vp, G, h, dop, dq, scale, Tp, H, K, V, NC, Kg, **meta)
    kern._dkdv_kernel[grid](qp, kp, vp, G, dhn, dop, dk, dv, scale, Tp, H, K, V, NC, Kg, **meta)
    return dq, dk, dv, dinit


def _segment_reverse_cumsum(x: torch.Tensor, bounds) -> torch.Tensor:
    # x: [B, T, ...] -> y_t = Σ_{s >= t, s in t's sequence} x_s (sequences from bounds, or whole rows)
    if bounds is None:
        return x.flip(1).cumsum(1).flip(1)
    parts = [x[:, s:e].flip(1).cumsum(1).flip(1) for s, e in bounds if e > s]
    return torch.cat(parts, dim=1) if parts else x


def _decay_grad(q, k, dq, dk, final, dfinal, g_shape, g_dtype, bounds, B, T):
    # dL/dB_t = q ⊙ dq - k ⊙ dk (+ rowsum(S_final ⊙ dS_final) at each sequence end) -> reverse cumsum -> g's shape.
    # For scalar / per-head decay the sums run in fp64: dg of a per-head decay is Σ_t (t + 1) dL/dB_t over strongly
    # cancelling terms, where fp32 sums lose ~10x accuracy against the torch path's autograd (measured at T=150).
    dt = torch.float64 if g_shape[-1] == 1 else dq.dtype
    dB = q.to(dt) * dq.to(dt) - k.to(dt) * dk.to(dt)                          # [B, T, H, K]
    end_term = None if dfinal is None else (final.to(dt) * dfinal.to(dt)).sum(-1)  # [n_states, H, K]
    if g_shape[-1] == 1:
        dB = dB.sum(-1, keepdim=True)
        end_term = None if end_term is None else end_term.sum(-1, keepdim=True)
    if end_term is not None:
        if bounds is None:
            dB[:, T - 1] += end_term
        else:
            last = [(n, e - 1) for n, (s, e) in enumerate(bounds) if e > s]
            rows, pos = (torch.tensor(x, device=dB.device) for x in zip(*last))
            dB[0].index_add_(0, pos, end_term[rows])
    dg = _segment_reverse_cumsum(dB, bounds)
    return dg.sum_to_size(g_shape).to(g_dtype)


class TritonLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g4, initial_state, scale, cu_seqlens):
        # q, k: [B, T, H, K]; v: [B, T, H, V]; g4: broadcastable to [B, T, H, K] or None;
        # initial_state: [B or N, H, K, V] or None -> o: [B, T, H, V], final: [B or N, H, K, V] fp32
        ctx.set_materialize_grads(False)
        B, T, H, K = q.shape
        bounds = seq_bounds(cu_seqlens, B, T)
        layout = make_layout(B, T, bounds, CHUNK_SIZE, q.device)
        n_states = B if bounds is None else len(bounds)
        qp, kp, vp = (layout.pad(x.contiguous()) for x in (q, k, v))
        G = _within_chunk_cumsum(g4, layout, B, T, H) if g4 is not None else torch.zeros(
            layout.rows, layout.padded_length, H, 1, dtype=torch.float32, device=q.device)
        init = None if initial_state is None else initial_state.float().contiguous()
        o, h, final, tables = _forward(qp, kp, vp, G, init, layout, scale, n_states)
        if init is not None:
            for n in layout.empty:  # an empty sequence hands its initial state straight through
                final[n] = init[n]
        ctx.save_for_backward(q, k, qp, kp, vp, G, h, final, *tables)
        g_meta = None if g4 is None else (g4.shape, g4.dtype)
        init_dtype = None if initial_state is None else initial_state.dtype
        ctx.meta = (layout, bounds, scale, n_states, g_meta, init_dtype)
        return layout.unpad(o), final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, qp, kp, vp, G, h, final, reset, end = ctx.saved_tensors
        layout, bounds, scale, n_states, g_meta, init_dtype = ctx.meta
        B, T, H, K = q.shape
        if do is None:
            do = torch.zeros(B, T, H, vp.shape[-1], dtype=vp.dtype, device=vp.device)
        dop = layout.pad(do.contiguous())
        dfinal = None if dfinal is None else dfinal.float().contiguous()
        dqp, dkp, dvp, dinit = _backward(qp, kp, vp, G, h, dop, dfinal, layout, (reset, end), scale, n_states)
        if dfinal is not None:
            for n in layout.empty:
                dinit[n] = dfinal[n]
        dq, dk, dv = (layout.unpad(x) for x in (dqp, dkp, dvp))
        dg = None
        if g_meta is not None and ctx.needs_input_grad[3]:
            dg = _decay_grad(q, k, dq, dk, final, dfinal, *g_meta, bounds, B, T)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(vp.dtype), dg, None if init_dtype is None else dinit.to(init_dtype), None, None)


def triton_linear_attention(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Triton forward and backward; arguments as `lsp.ops.linear_attention` with g already broadcastable to
    [B, T, H, K] ([1, 1, H, 1], [B, T, H, 1] or [B, T, H, K]). Returns (o [B, T, H, V] in q's dtype, final state
    [B or N, H, K, V] fp32 or None). fp64 inputs and empty inputs take the chunked torch path."""
    if q.dtype == torch.float64 or q.shape[1] == 0:
        return chunk_linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    o, final = TritonLinearAttention.apply(q, k, v, g, initial_state, float(scale), cu_seqlens)
    return o, (final if output_final_state else None)
