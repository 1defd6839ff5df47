"""`sp_softmax_attention`: sequence-parallel softmax attention by all-gathering K and V (LASP-2H).

Every rank gathers the keys and values of all ranks (one all_gather of its [2, B, T_local, Hkv, D] K|V), puts them
back in global order and attends its local queries to them. Causal without documents: each local segment is the
causal suffix of the keys up to its end (`causal_suffix_attention`: no mask is formed and only the causal pairs are
scored); with cu_seqlens: the causal / document mask built from global positions
(`document_mask(q_positions=..., k_positions=...)`). Backward: a rank's K, V gradient is the sum over
ranks of the gradients of its slot in the gathered buffer, one all_reduce of the [W, ...] gradient then its slot
(gloo has no reduce_scatter). Under the zigzag layout every rank holds one early and one late segment, so the
causal work per rank is balanced (see `attention_pairs_per_rank`).
"""
from __future__ import annotations

import torch

from lsp.ops.softmax import causal_suffix_attention, check_softmax_inputs, document_mask, sdpa

from .comm import gather_rows
from .context import SPContext


def sp_softmax_attention(q, k, v, *, sp, causal=True, scale=None, cu_seqlens=None, method="allgather"):
    """Softmax attention of the local queries over the whole sequence; equals `lsp.ops.softmax_attention` on the
    gathered sequence.

    q: [R·B, T_local, H, D]; k, v: [R·B, T_local, Hkv, D] (grouped-query when Hkv < H), local shards from
    `sp.shard`. cu_seqlens: GLOBAL int32 [N + 1] document boundaries (B == 1). Returns [R·B, T_local, H, D].
    """
    if not isinstance(sp, SPContext):
        raise ValueError(f"sp must be an lsp.parallel.SPContext, got {type(sp).__name__}")
    if method != "allgather":
        raise ValueError(f"method must be 'allgather' for softmax layers (LASP-2H), got {method!r}")
    check_softmax_inputs(q, k, v)
    R, W, L = sp.rows, sp.world_size, sp.segments_per_rank
    B, T_local = q.shape[0] // R, q.shape[1]
    T = T_local * W
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens requires B == 1 (packed sequences), got B={B} per rank")
    if cu_seqlens is not None and int(cu_seqlens[-1]) != T:
        raise ValueError(f"cu_seqlens must end at the global length {T}, got {int(cu_seqlens[-1])}")
    Ts = sp.segment_length(T_local)
    kv = torch.stack([k, v]).reshape(2, R, B, T_local, *k.shape[2:]).transpose(0, 1)  # [R, 2, B, T_local, Hkv, D]
    kv_all = gather_rows(kv.contiguous(), sp.comm, "softmax_kv")                       # [W, 2, B, T_local, Hkv, D]
    segs = kv_all.reshape(W, 2, B, L, Ts, *k.shape[2:])
    kv_full = torch.cat([segs[sp.owner(s)[0], :, :, sp.owner(s)[1]] for s in range(sp.num_segments)], dim=2)
    k_full, v_full = kv_full[0], kv_full[1]                                              # [B, T, Hkv, D]
    if causal and cu_seqlens is None:     # segment s of the sequence attends the keys [0, (s + 1)·Ts), causally
        return torch.cat([
            torch.cat([causal_suffix_attention(q[row * B : (row + 1) * B, i * Ts : (i + 1) * Ts],
                                               k_full[:, : (s + 1) * Ts], v_full[:, : (s + 1) * Ts], scale=scale)
                       for i, s in enumerate(sp.rank_segments(rank))], dim=1)
            for row, rank in enumerate(sp.comm.ranks)], dim=0)
    positions = sp.local_positions(T_local, q.device)
    bounds = cu_seqlens if cu_seqlens is not None else torch.tensor([0, T], device=q.device)
    k_pos = torch.arange(T, device=q.device)
    outs = []
    for row in range(R):
        mask = None
        if causal or cu_seqlens is not None:
            mask = document_mask(bounds, T, causal, q.device, q_positions=positions[row], k_positions=k_pos)
        outs.append(sdpa(q[row * B : (row + 1) * B], k_full, v_full, mask=mask, scale=scale))
    return torch.cat(outs, dim=0)


def attention_pairs_per_rank(world_size: int, layout: str, T: int, causal: bool = True) -> list[int]:
    """Number of (query, key) pairs each rank scores; attention FLOPs = 4 · H · D · pairs (QKᵀ and PV)."""
    from .context import LAYOUTS

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n = world_size * (2 if layout == "zigzag" else 1)
    if T % n:
        raise ValueError(f"T={T} must be divisible by {n} segments")
    Ts = T // n
    per_seg = [(s * Ts * Ts + Ts * (Ts + 1) // 2) if causal else Ts * T for s in range(n)]
    if layout == "contiguous":
        return per_seg
    return [per_seg[r] + per_seg[n - 1 - r] for r in range(world_size)]


def attention_flops_balance(world_size: int, layout: str, T: int, causal: bool = True) -> tuple[int, int, float]:
    """(max, min, max/min) of the per-rank causal attention pairs: ~2W-1 contiguous, ~1 zigzag."""
    pairs = attention_pairs_per_rank(world_size, layout, T, causal)
    return max(pairs), min(pairs), max(pairs) / min(pairs)
