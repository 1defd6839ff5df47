"""`sp_softmax_attention`: sequence-parallel softmax attention by all-gathering K and V (LASP-2H).

Every rank gathers the keys and values of all ranks in one all_gather and attends its local queries to them,
mask-free. The local tokens are cut into pieces at every segment start and every document start
(`softmax_pieces`, built on the host once per batch with the context's segment plan); piece [a, b) of document
[d, e) attends

    its own tokens [a, b) (causal: key j <= query i), from the local k, v, and
    the rest of its document, fully visible: [d, a) when causal, [d, a) and [b, e) otherwise, from the gathered K|V,

merged by log-sum-exp (`lsp.ops.softmax.piecewise_attention`). Without cu_seqlens the whole sequence is one
document, so segment s attends [0, s·Ts) plus its causal diagonal. No [T_local, T] mask or score tensor exists.

Gathered buffer, laid out so every key range is a view of it (no reordering copy): a rank sends its K|V as
[Ts, L, B, 2, Hkv, D] (token-major, its L segments interleaved), the late zigzag segment token-reversed. The
gather is [W, Ts, L, ...]; source l = buffer[:, :, l] viewed as [W·Ts, ...] is then the first half of the sequence
in order (l = 0) and the second half in reverse order (l = 1; contiguous layout: the whole sequence, l = 0).
Fully visible blocks do not depend on the order of their keys, so any global key range is at most two views.
Grouped-query heads reach the kernel unrepeated. Backward: a rank's K|V gradient is the sum over ranks of its
slot's gradient (`AllGatherRows`: reduce_scatter on NCCL, all_reduce + own slot on gloo). Under the zigzag layout
every rank holds one early and one late segment, so the causal work per rank is balanced
(see `attention_pairs_per_rank`).

`sp_softmax_attention` dispatches by name through the softmax family's method registry (`SOFTMAX`, a
`lsp.parallel.registry.MethodRegistry` like the linear layers' `lsp.parallel.methods.LINEAR`): a method is
registered once with its implementation and its cost formula (`register_softmax_method`), which
`lsp.plan.costmodel.softmax_exchange_cost` and the planner read. This file registers LASP-2H as "allgather"; ring
attention ("ring", nothing of the global length kept) registers itself from ring_softmax.py. The names the config
accepts are `lsp.names.SOFTMAX_SP_METHODS`; `check_registered` raises at import if one has no method. The method
comes from the call or the context (`SPContext(softmax_method=...)`).

Cost of one softmax layer and training step (what the planner prices; kv the rank's local K|V bytes, g = its fp32
gradient, t_attention the local forward attention, t_diagonal its causal diagonal block, hw the cost model's
Hardware: latency α, bandwidth β, hop overhead γ):
    allgather  gather (W-1)·(α + kv/β) forward and the gradient reduce backward, each hidden behind the diagonal
               block; keeps the gathered K|V of the whole sequence (W·kv) for backward
    ring       W-1 dependent hops each way (α + γ exposed per hop), the transfer hidden behind each step's
               attention; backward carries kv and the fp32 dK|dV; keeps nothing of the global length
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Callable

import torch

from lsp.names import SOFTMAX_SP_METHODS
from lsp.ops.softmax import check_softmax_inputs, piece_runs, piecewise_attention

from .comm import gather_rows
from .context import SPContext
from .registry import MethodRegistry


@dataclass(frozen=True)
class SoftmaxCost:
    exposed_s: float        # communication not hidden, forward + backward
    bytes: float            # received per GPU, forward + backward
    kept: float             # bytes of K|V beyond the local ones kept for backward
    workspace: float        # transient bytes of one layer's pass (one layer at a time)


@dataclass(frozen=True)
class SoftmaxMethod:
    name: str
    label: str
    handle: Callable        # fn(q, k, v, sp, causal, scale, cu_seqlens) -> o, inputs checked by sp_softmax_attention
    cost: Callable          # cost(W, kv, g, t_attention, t_diagonal, hw) -> SoftmaxCost (module docstring)


SOFTMAX = MethodRegistry("softmax", SOFTMAX_SP_METHODS)   # the softmax layers' methods


def register_softmax_method(name: str, *, cost: Callable, label: str | None = None):
    """Decorator: register fn as the softmax SP method `name` with its cost formula (both required)."""
    def register(fn):
        SOFTMAX.register(SoftmaxMethod(name, label or name, fn, cost))
        return fn
    return register


def softmax_method(name: str) -> SoftmaxMethod:
    """The registered softmax method `name`; an unknown name raises one line naming the choices."""
    return SOFTMAX.get(name)


def softmax_methods() -> tuple[str, ...]:
    """The registered softmax method names (the built-ins first, in `lsp.names.SOFTMAX_SP_METHODS` order)."""
    return SOFTMAX.names()


def allgather_cost(W: int, kv: float, g: float, t_attn: float, t_diag: float, hw) -> SoftmaxCost:
    # LASP-2H (module docstring): both collectives hidden behind the causal diagonal block
    gather = (W - 1) * (hw.latency + kv / hw.bandwidth)
    return SoftmaxCost(2 * max(0.0, gather - t_diag), 2 * (W - 1) * kv, W * kv, W * kv)


def sp_softmax_attention(q, k, v, *, sp, causal=True, scale=None, cu_seqlens=None, method=None):
    """Softmax attention of the local queries over the whole sequence; equals `lsp.ops.softmax_attention` on the
    gathered sequence.

    q: [R·B, T_local, H, D]; k, v: [R·B, T_local, Hkv, D] (grouped-query when Hkv < H), local shards from
    `sp.shard`. cu_seqlens: GLOBAL int32 [N + 1] document boundaries (B == 1). method: "allgather" (LASP-2H) or
    "ring" (ring attention, lsp.parallel.ring_softmax); None: the context's `softmax_method`.
    Returns [R·B, T_local, H, D].
    """
    if not isinstance(sp, SPContext):
        raise ValueError(f"sp must be an lsp.parallel.SPContext, got {type(sp).__name__}")
    entry = softmax_method(sp.softmax_method if method is None else method)   # an unknown name raises
    check_softmax_inputs(q, k, v)
    B = q.shape[0] // sp.rows
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens requires B == 1 (packed sequences), got B={B} per rank")
    return entry.handle(q, k, v, sp, causal, scale, cu_seqlens)


@register_softmax_method("allgather", cost=allgather_cost, label="LASP-2H (all-gather K|V)")
def allgather_softmax_attention(q, k, v, sp, causal, scale, cu_seqlens):
    """LASP-2H (module docstring); inputs checked by `sp_softmax_attention`."""
    R, T_local = sp.rows, q.shape[1]
    B = q.shape[0] // R
    batch = sp.segment_plan(T_local, cu_seqlens)   # one host read of cu_seqlens per batch, shared by every layer
    plans = batch.derived(("softmax", causal, B == 1),
                          lambda: softmax_pieces(batch.bounds, sp, T_local, causal, batched=B == 1))
    sources = gathered_kv_sources(k, v, sp)                       # [L, T/L, B, 2, Hkv, D] view of the gather
    if R == 1:
        return piecewise_attention(q, k, v, plans[0], kv_sources=sources, causal=causal, scale=scale)
    rows = [slice(row * B, (row + 1) * B) for row in range(R)]
    return torch.cat([piecewise_attention(q[r], k[r], v[r], plan, kv_sources=sources, causal=causal, scale=scale)
                      for r, plan in zip(rows, plans)])


def softmax_pieces(bounds: list[int], sp: SPContext, T_local: int, causal: bool, batched: bool = True):
    """Per held rank, the `PieceRun`s of its local tokens (see the module docstring); host-only, O(pieces · log N).

    bounds: sorted global document boundaries [0, ..., T]. A piece that starts a segment inside a document attends
    that document's earlier keys as gathered blocks; pieces that start a document attend only their own tokens, and
    adjacent ones of equal length are batched when `batched` (B == 1).
    """
    Ts, T = sp.segment_length(T_local), T_local * sp.world_size
    plans = []
    for rank in sp.comm.ranks:
        cuts, blocks = [], {}
        for start, a, b, doc_start, doc_end in query_pieces(bounds, sp, rank, Ts):
            visible = [(doc_start, a)] + ([] if causal else [(b, doc_end)])
            extra = [blk for lo, hi in visible for blk in gathered_blocks(lo, hi, T, sp.segments_per_rank)]
            if extra:
                blocks[len(cuts)] = extra
            cuts.append(start)
        plans.append(piece_runs(cuts + [T_local], blocks, batched=batched))
    return plans


def query_pieces(bounds: list[int], sp: SPContext, rank: int, Ts: int):
    """The query pieces of `rank`: its held segments cut at every document start, in local order. Yields
    (local start, global [a, b), its document [d, e)); bounds: sorted global document boundaries [0, ..., T]."""
    for l, seg in enumerate(sp.rank_segments(rank)):
        g0, g1 = seg * Ts, (seg + 1) * Ts
        starts = [g0] + bounds[bisect_right(bounds, g0) : bisect_left(bounds, g1)]
        for a, b in zip(starts, starts[1:] + [g1]):
            yield l * Ts + a - g0, a, b, bounds[bisect_right(bounds, a) - 1], bounds[bisect_left(bounds, b)]


def gathered_blocks(lo: int, hi: int, T: int, sources: int) -> list[tuple[int, int, int]]:
    """Global key range [lo, hi) as (source, first, length) blocks of the gathered sources: one source holds the
    sequence in order; two (zigzag) hold the first half in order and the second half reversed."""
    if sources == 1:
        return [(0, lo, hi - lo)] if hi > lo else []
    half, out = T // 2, []
    if lo < min(hi, half):
        out.append((0, lo, min(hi, half) - lo))
    if max(lo, half) < hi:
        out.append((1, T - hi, hi - max(lo, half)))                 # position p sits at T - 1 - p
    return out


def gathered_kv_sources(k, v, sp: SPContext):
    """All-gather the K|V of every rank; returns the sources view [L, T/L, B, 2, Hkv, D] of the gathered buffer.

    k, v: [R·B, T_local, Hkv, D]. Sent per rank: [Ts, L, B, 2, Hkv, D] with the late zigzag segment reversed.
    """
    R, L, W = sp.rows, sp.segments_per_rank, sp.world_size
    B, Ts = k.shape[0] // R, sp.segment_length(k.shape[1])
    kv = torch.stack([k, v], dim=2).view(R, B, L, Ts, 2, *k.shape[2:])
    if L == 2:
        kv = torch.cat([kv[:, :, :1], kv[:, :, 1:].flip(3)], dim=2)
    send = kv.permute(0, 3, 2, 1, 4, 5, 6).contiguous()                # [R, Ts, L, B, 2, Hkv, D]
    gathered = gather_rows(send, sp.comm, "softmax_kv")                # [W, Ts, L, B, 2, Hkv, D]
    return gathered.permute(2, 0, 1, 3, 4, 5, 6).view(L, W * Ts, *gathered.shape[3:])


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
