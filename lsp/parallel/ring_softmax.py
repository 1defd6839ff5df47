"""Ring attention for softmax layers (`softmax_method="ring"`): K, V blocks passed around the ring.

LASP-2H (softmax.py) all-gathers the K|V of the whole sequence and keeps it for backward: O(T) per rank. Here no
rank ever holds more than two ranks' K|V. With W ranks, at ring step j = 0 .. W-1 rank r holds the K|V of rank
src = (r - j) mod W; while its queries attend that block, the block moves on to rank r + 1 (one batched isend /
irecv, `comm.ring_shift`), so the next block's transfer overlaps this block's attention. Each query keeps a
running output and log-sum-exp and merges every block into them (online softmax, `lsp.ops.softmax.merge_blocks`):

    lse ← log(e^lse + e^lse_b),   o ← e^(lse_old - lse)·o + e^(lse_b - lse)·o_b.

What a query piece [a, b) of document [d, e) attends at step j (host plan `ring_blocks`, built once per batch):
its own tokens causally at j = 0, and the part of [d, a) (causal) or [d, e) (not causal) that the visiting rank's
segments hold, fully visible, by the flash kernel on strided views (grouped-query heads unrepeated). Under the
zigzag layout every rank holds one early and one late segment, so every step costs every rank about the same.

Backward (the structure of ring-flash-attention, written for lsp's plan): saved are only the local q, k, v, the
merged o and lse. K|V go around the ring once more; beside them travels the fp32 accumulator of the visiting
block's dK|dV: at step j rank r adds its queries' share (the flash kernel's backward with the merged o and lse
gives each block's exact share) and passes it on, and after W hops each accumulator is back at its owner. dq
stays local. Bytes per rank and layer: forward (W-1)·kv, backward (W-1)·kv + W·dkv, with kv = 2·B·T_local·Hkv·D
elements in the input dtype and dkv the same in fp32 (fp64 inputs: fp64).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lsp.ops.softmax import flash_block_backward, flash_block_forward, merge_blocks

from .collectives import join_token
from .context import SPContext
from .softmax import SoftmaxCost, query_pieces, register_softmax_method

TAG = "softmax_ring"


@dataclass(frozen=True)
class RingBlock:
    """`count` query pieces of q_len tokens from local position q_start attend, each, k_len keys of the visiting
    rank from its local position k_start (count > 1: adjacent diagonal blocks batched into one kernel call)."""
    q_start: int
    k_start: int
    q_len: int
    k_len: int
    causal: bool
    count: int = 1


def ring_cost(W: int, kv: float, g: float, t_attn: float, t_diag: float, hw) -> SoftmaxCost:
    # every step waits for its block (a dependent hop: α + γ exposed), the transfer hides behind the step's attention;
    # backward carries K|V and the fp32 dK|dV, which returns to its owner after the last hop
    step, hop = t_attn / W, hw.latency + hw.hop_overhead
    forward = (W - 1) * (hop + max(0.0, kv / hw.bandwidth - step))
    backward = (W - 1) * (hop + max(0.0, (kv + g) / hw.bandwidth - 2 * step)) + hop + g / hw.bandwidth
    return SoftmaxCost(forward + backward, 2 * (W - 1) * kv + W * g, 0.0, 2 * kv + 2 * g)


@register_softmax_method("ring", cost=ring_cost, label="ring attention (K|V around the ring)")
def ring_softmax_attention(q, k, v, sp: SPContext, causal, scale, cu_seqlens):
    """Ring attention (module docstring). q: [R·B, T_local, H, D]; k, v: [R·B, T_local, Hkv, D] local shards;
    cu_seqlens: GLOBAL document boundaries (B == 1). Returns [R·B, T_local, H, D]."""
    T_local, B = q.shape[1], q.shape[0] // sp.rows
    batch = sp.segment_plan(T_local, cu_seqlens)
    plans = batch.derived(("ring", causal, B == 1),
                          lambda: ring_blocks(batch.bounds, sp, T_local, causal, batched=B == 1))
    return _RingAttention.apply(q, k, v, join_token(), sp, plans, causal, scale)


def ring_blocks(bounds: list[int], sp: SPContext, T_local: int, causal: bool, batched: bool = True):
    """Per held rank and ring step j, the `RingBlock`s its queries attend of rank (rank - j) mod W's K|V;
    host-only. bounds: sorted global document boundaries [0, ..., T]."""
    Ts, W = sp.segment_length(T_local), sp.world_size
    plans = []
    for rank in sp.comm.ranks:
        pieces = list(query_pieces(bounds, sp, rank, Ts))
        steps = []
        for j in range(W):
            src_segments = list(enumerate(sp.rank_segments((rank - j) % W)))
            blocks = []
            for start, a, b, d, e in pieces:
                if j == 0 and causal:
                    blocks.append(RingBlock(start, start, b - a, b - a, True))
                lo, hi = (d, a) if causal else (d, e)             # the rest of the document, fully visible
                for l, seg in src_segments:
                    k0, k1 = max(lo, seg * Ts), min(hi, (seg + 1) * Ts)
                    if k0 < k1:
                        blocks.append(RingBlock(start, l * Ts + k0 - seg * Ts, b - a, k1 - k0, False))
            steps.append(_batch_diagonals(blocks) if batched else blocks)
        plans.append(steps)
    return plans


def _batch_diagonals(blocks: list[RingBlock]) -> list[RingBlock]:
    # adjacent square blocks on the diagonal (q range == k range) of equal length: one batched call (B == 1)
    out: list[RingBlock] = []
    for blk in blocks:
        last = out[-1] if out else None
        if (last is not None and blk.q_start == blk.k_start and last.q_start == last.k_start
                and blk.q_len == blk.k_len == last.q_len == last.k_len and blk.causal == last.causal
                and blk.q_start == last.q_start + last.count * last.q_len):
            out[-1] = RingBlock(last.q_start, last.k_start, last.q_len, last.k_len, last.causal, last.count + 1)
        else:
            out.append(blk)
    return out


def _span(x, start: int, length: int, count: int):
    # x: [B, T, h, *] -> [B·count, h, length, *] view of `count` adjacent pieces (lse [B, T, H] -> [B·c, H, len])
    piece = x[:, start : start + count * length]
    return piece.view(x.shape[0] * count, length, *x.shape[2:]).transpose(1, 2)


def _views(blk: RingBlock, q_like, kv):
    # q-side tensors [B, T, ...] and the visiting K|V [B, T, 2, Hkv, D] -> the block's query views, keys, values
    qs = [_span(x, blk.q_start, blk.q_len, blk.count) for x in q_like]
    return qs, _span(kv[:, :, 0], blk.k_start, blk.k_len, blk.count), _span(kv[:, :, 1], blk.k_start, blk.k_len,
                                                                              blk.count)


class _RingAttention(torch.autograd.Function):
    """Forward and backward rings (module docstring); saves q, k, v, o and lse only (all T_local-sized)."""

    @staticmethod
    def forward(ctx, q, k, v, token, sp, plans, causal, scale):
        R, W = sp.rows, sp.world_size
        B, acc = q.shape[0] // R, torch.promote_types(q.dtype, torch.float32)
        kv = _stack_kv(k, v, R)                                          # [R, B, T, 2, Hkv, D]
        o = q.new_zeros(q.shape, dtype=acc)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=acc)          # [R·B, T, H]
        for j in range(W):
            work, arriving = sp.comm.ring_shift(kv, TAG) if j < W - 1 else (None, None)
            for r in range(R):
                rows = slice(r * B, (r + 1) * B)
                for blk in plans[r][j]:
                    (q_b, o_v, lse_v), k_b, v_b = _views(blk, (q[rows], o[rows], lse[rows]), kv[r])
                    o_b, lse_b = flash_block_forward(q_b, k_b, v_b, blk.causal, scale)
                    o_new, lse_new = merge_blocks(o_v, lse_v, o_b, lse_b)
                    o_v.copy_(o_new)
                    lse_v.copy_(lse_new)
            if work is not None:
                work.wait()
                kv = arriving
        out = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sp, ctx.plans, ctx.causal, ctx.scale = sp, plans, causal, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        sp, plans = ctx.sp, ctx.plans
        R, W = sp.rows, sp.world_size
        B, acc = q.shape[0] // R, torch.promote_types(q.dtype, torch.float32)
        do = do.contiguous()
        kv = _stack_kv(k, v, R)
        dq = torch.zeros_like(q, dtype=acc)
        passing = None                                  # (work, dK|dV accumulator arriving from rank - 1)
        for j in range(W):
            work, arriving = sp.comm.ring_shift(kv, TAG + ":bwd") if j < W - 1 else (None, None)
            dkv = torch.zeros_like(kv, dtype=acc)       # this step's share of the visiting block's dK|dV
            for r in range(R):
                rows = slice(r * B, (r + 1) * B)
                for blk in plans[r][j]:
                    (do_b, q_b, o_b, lse_b, dq_b), k_b, v_b = _views(blk, (do[rows], q[rows], o[rows], lse[rows],
                                                                           dq[rows]), kv[r])
                    _, dk_b, dv_b = _views(blk, (), dkv[r])
                    g_q, g_k, g_v = flash_block_backward(do_b, q_b, k_b, v_b, o_b, lse_b.contiguous(), blk.causal,
                                                         ctx.scale)
                    dq_b += g_q
                    dk_b += g_k
                    dv_b += g_v
            if passing is not None:
                passing[0].wait()
                dkv += passing[1]
            passing = sp.comm.ring_shift(dkv, TAG + ":dkv:bwd") if W > 1 else (None, dkv)
            if work is not None:
                work.wait()
                kv = arriving
        if passing[0] is not None:
            passing[0].wait()
        dk, dv = passing[1].flatten(0, 1).unbind(2)     # after W hops: this rank's own dK|dV
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _stack_kv(k, v, R: int):
    # k, v: [R·B, T, Hkv, D] -> K|V [R, B, T, 2, Hkv, D], the unit that travels
    return torch.stack([k, v], dim=2).view(R, k.shape[0] // R, *k.shape[1:2], 2, *k.shape[2:])


__all__ = ["ring_softmax_attention", "ring_blocks", "RingBlock"]
