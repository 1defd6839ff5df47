"""Analytic step-time model of sequence-parallel linear attention: the three lsp exchanges, plus ring-KV.

One training step (forward + backward) of a pure linear-attention LM on W GPUs, T tokens, batch 1, per GPU:

    compute   = 3 · FLOPs_fwd(T/W) / F                         (backward = 2 × forward)
    step      = compute + Σ_layers Σ_{fwd, bwd} exposed_comm(method)

with s = H·K·V·state_bytes the state of one layer, d = H·K_g·4 its total decay (K_g = K per-key, 1 scalar), β the
per-GPU bandwidth, α the per-message latency, F the sustained kernel throughput, L the segments per rank (1
contiguous, 2 zigzag). Per layer and pass (forward, and once more backward), exactly what lsp.parallel.exchange
does (bytes: the per-rank average that comm_stats() counts):

* ring (LASP-1): one chain through all segments, (W-1)·L dependent hops; each hop receives the state, updates it
  and sends it on, blocking, nothing overlaps: (W-1)·L · (α + s/β + t_update + γ), t_update = 3·s / HBM
  bandwidth, γ = the synchronisation / kernel launch a dependent hop costs. Bytes (W-1)·L·s/W.
* allgather (LASP-2): one all-gather of L·(s + d) per rank (forward: states and decays; backward: gradients and
  decays again), (W-1)·(α + L·(s+d)/β), overlapped with the local intra-chunk compute of that pass, plus the local
  prefix over the W·L segments (3·W·L·s bytes at HBM bandwidth). Bytes (W-1)·L·(s + d).
* allscan (ZeCO All-Scan), n_b = scan_blocks blocks along K, each hop an elementwise update, overlapped with the
  intra-chunk compute: contiguous, the chain pipelined, (W + n_b - 2)·(α + s/(n_b·β)), bytes (W-1)·s/W; zigzag,
  both half chains at once, the second sending its decay product first ((W-1)·α more), then a tree broadcast of
  the midpoint state, ⌈log2 W⌉·(α + s/β); bytes (W-1)·(3s + d)/W. `best_scan_blocks` picks n_b.
* ring-KV (ring attention applied to linear layers): W-1 hops of the local K, V activations (2·T_loc·H·K·2 bytes)
  overlapped with the block products of each hop; exposed (W-1)·max(0, t_hop - t_block).

Defaults describe a 1B Linear-Llama-3 / GLA-1B-like model (16 layers, d = 2048, 16 heads of 128, SwiGLU 8192,
vocab 128256) on H100s: F = 400 TFLOP/s sustained (bf16), HBM 3 TB/s, α = 10 µs, state in fp32. β = 18 GB/s and
γ = 60 µs are fitted so that the model reproduces the published ratios (docs/benchmarks_sp.md):
ZeCO / LASP-2 ≈ 1.6× at 8M tokens on 256 GPUs, LASP-2 / LASP-1 ≈ 1.15× at 2048K tokens on 64 GPUs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from lsp.names import SCAN_BLOCKS, SP_METHODS

METHODS = ("ring", "allgather", "allscan", "ringkv")  # the lsp exchanges + ring-KV for comparison
LABELS = {"ring": "LASP-1 (ring)", "allgather": "LASP-2 (all-gather)", "allscan": "ZeCO All-Scan",
          "ringkv": "ring-KV"}
BLOCK_CHOICES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class ModelSpec:
    hidden_size: int = 2048
    num_layers: int = 16
    num_heads: int = 16
    head_dim: int = 128            # K = V
    ffn_size: int = 8192
    vocab_size: int = 128256
    chunk_size: int = 64


@dataclass
class Hardware:
    flops: float = 400e12          # sustained kernel throughput F, FLOP/s
    bandwidth: float = 18e9        # β, bytes/s per GPU for inter-GPU messages (fitted)
    latency: float = 10e-6         # α, s per message
    hop_overhead: float = 60e-6    # γ, s per dependent LASP-1 hop (sync + launch, fitted)
    hbm: float = 3e12              # bytes/s, for the local state combine
    state_bytes: int = 4           # fp32 states
    act_bytes: int = 2             # bf16 activations (ring-KV)


@dataclass
class StepTime:
    method: str
    compute_s: float
    comm_exposed_s: float
    comm_bytes_per_gpu: float
    total_s: float = field(init=False)

    def __post_init__(self):
        self.total_s = self.compute_s + self.comm_exposed_s


def _flops_fwd_per_token(m: ModelSpec) -> tuple[float, float]:
    # (all forward FLOPs per token, the intra-chunk attention part that an exchange can hide behind)
    d, H, K = m.hidden_size, m.num_heads, m.head_dim
    dense = 2 * (4 * d * d + 3 * d * m.ffn_size)
    intra = H * 2 * m.chunk_size * 2 * K            # Q Kᵀ and P V inside a chunk
    inter = H * 2 * 2 * K * K                        # q·S and the state update
    per_layer = dense + intra + inter
    return m.num_layers * per_layer + 2 * d * m.vocab_size, intra


def exchange_time(method: str, world_size: int, state_bytes: float, t_overlap: float,
                  hw: Hardware | None = None, *, layout: str = "contiguous", decay_bytes: float = 0.0,
                  scan_blocks: int | None = None) -> tuple[float, float]:
    """(exposed seconds, bytes received per GPU) of one linear layer's state exchange in one pass (forward or
    backward) for ring / allgather / allscan; state_bytes is the whole [B, H, K, V] state, decay_bytes its total
    decay [B, H, K_g], t_overlap the local intra-chunk compute an asynchronous exchange hides behind, scan_blocks
    All-Scan's n_b (None: the best). Formulas: module docstring."""
    hw, W, s, d = hw or Hardware(), world_size, state_bytes, decay_bytes
    if method not in SP_METHODS:
        raise ValueError(f"method must be one of {SP_METHODS}, got {method!r}")
    if W == 1:
        return 0.0, 0.0
    L = 2 if layout == "zigzag" else 1
    if method == "ring":
        t_update = 3 * s / hw.hbm
        return (W - 1) * L * (hw.latency + s / hw.bandwidth + t_update + hw.hop_overhead), (W - 1) * L * s / W
    if method == "allgather":
        gather = (W - 1) * (hw.latency + L * (s + d) / hw.bandwidth)
        return max(0.0, gather - t_overlap) + 3 * W * L * s / hw.hbm, (W - 1) * L * (s + d)
    nb = scan_blocks or best_scan_blocks(W, s, t_overlap, hw, layout=layout)
    chain = (W + nb - 2) * (hw.latency + s / (nb * hw.bandwidth))
    if layout != "zigzag":
        return max(0.0, chain - t_overlap), (W - 1) * s / W
    tree = math.ceil(math.log2(W)) * (hw.latency + s / hw.bandwidth)
    return max(0.0, chain + (W - 1) * hw.latency + tree - t_overlap), (W - 1) * (3 * s + d) / W


def best_scan_blocks(world_size: int, state_bytes: float, t_overlap: float, hw: Hardware | None = None, *,
                     layout: str = "contiguous") -> int:
    """The All-Scan block count n_b (of BLOCK_CHOICES) with the least exposed time; the smallest on a tie."""
    times = {nb: exchange_time("allscan", world_size, state_bytes, t_overlap, hw, layout=layout,
                               scan_blocks=nb)[0] for nb in BLOCK_CHOICES}
    best = min(times.values())
    return min(nb for nb, t in times.items() if t <= best * (1 + 1e-9)) if best > 0 else SCAN_BLOCKS


def step_time(method: str, world_size: int, seq_len: int, m: ModelSpec | None = None,
              hw: Hardware | None = None, layout: str = "contiguous") -> StepTime:
    """Modelled fwd+bwd step time of one method; see the module docstring for the formulas."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    m, hw = m or ModelSpec(), hw or Hardware()
    W, T_loc = world_size, seq_len / world_size
    flops_token, intra_token = _flops_fwd_per_token(m)
    compute = 3 * flops_token * T_loc / hw.flops
    t_intra = intra_token * T_loc / hw.flops            # per layer and pass: hides an asynchronous exchange
    H, K = m.num_heads, m.head_dim
    s = H * K * K * hw.state_bytes
    if W == 1:
        return StepTime(method, compute, 0.0, 0.0)
    if method == "ringkv":
        kv = 2 * T_loc * H * K * hw.act_bytes
        block = 2 * 2 * T_loc * H * K * K / hw.flops
        per_pass = (W - 1) * max(0.0, hw.latency + kv / hw.bandwidth - block)
        bytes_pass = (W - 1) * kv
    else:
        per_pass, bytes_pass = exchange_time(method, W, s, t_intra, hw, layout=layout)
    passes = 2 * m.num_layers
    return StepTime(method, compute, passes * per_pass, passes * bytes_pass)


def plan(world_size: int, seq_len: int, *, model: ModelSpec | None = None, hardware: Hardware | None = None,
         methods=METHODS) -> list[dict]:
    """Modelled step time of every method, fastest first: [{method, label, compute_s, comm_exposed_s,
    comm_bytes_per_gpu, total_s, tokens_per_s, speedup_vs_slowest}].

    `lsp plan` prints this. Example: plan(256, 8 * 2**20) ranks All-Scan first, ~1.6x faster than LASP-2.
    """
    if world_size < 1 or seq_len < world_size:
        raise ValueError(f"need world_size >= 1 and seq_len >= world_size, got {world_size}, {seq_len}")
    rows = [asdict(step_time(mth, world_size, seq_len, model, hardware)) for mth in methods]
    slowest = max(r["total_s"] for r in rows)
    for r in rows:
        r["label"] = LABELS[r["method"]]
        r["tokens_per_s"] = seq_len / r["total_s"]
        r["speedup_vs_slowest"] = slowest / r["total_s"]
    return sorted(rows, key=lambda r: r["total_s"])


def format_plan(rows: list[dict]) -> str:
    """Markdown table of `plan` rows."""
    lines = ["| method | step s | compute s | exposed comm s | comm GB/GPU | tokens/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['total_s']:.3f} | {r['compute_s']:.3f} | {r['comm_exposed_s']:.3f} | "
                     f"{r['comm_bytes_per_gpu'] / 1e9:.2f} | {r['tokens_per_s']:.3g} |")
    return "\n".join(lines)


def ratio(slow: str, fast: str, world_size: int, seq_len: int, **kw) -> float:
    """step_time(slow) / step_time(fast)."""
    return step_time(slow, world_size, seq_len, **kw).total_s / step_time(fast, world_size, seq_len, **kw).total_s


# ------------------------------------------------------------------------------------------- softmax layers
#
# A softmax layer under SP (lsp.parallel.softmax, lsp.parallel.ring_softmax), per layer and training step (forward
# and backward), with kv = the rank's local K|V in activation bytes (2·b·T_loc·Hkv·Dh·act_bytes), g = the same in
# fp32 (the dK|dV accumulator), t_attn the rank's forward attention compute (zigzag: every rank and every ring step
# alike), t_diag the rank's causal diagonal block (needs no remote K|V):
#
#   allgather (LASP-2H)  forward all-gather of K|V, backward reduce of their gradients, each (W-1)·(α + kv/β)
#                        hidden behind t_diag; bytes 2·(W-1)·kv. Kept for backward: the gathered K|V, W·kv; its
#                        gradient buffer in backward: W·kv more while one layer's backward runs.
#   ring                 forward W-1 hops of kv, the transfer hidden behind one step's attention t_attn/W; every
#                        step waits for its block, a dependent hop like LASP-1's, so its latency and
#                        synchronisation α + γ stay exposed: (W-1)·(α + γ + max(0, kv/β - t_attn/W)); backward the
#                        same with kv + g behind 2·t_attn/W, plus the last hop of g home, α + γ + g/β; bytes
#                        (W-1)·kv forward, (W-1)·kv + W·g backward. Kept: nothing beyond the local q, k, v, o, lse;
#                        working set: two K|V blocks and two dK|dV accumulators, 2·kv + 2·g. (LASP-2H's gather is
#                        one collective, so it pays α per peer but no per-step synchronisation.)


@dataclass(frozen=True)
class SoftmaxCost:
    exposed_s: float        # communication not hidden, forward + backward
    bytes: float            # received per GPU, forward + backward
    kept: float             # bytes of K|V beyond the local ones kept for backward
    workspace: float        # transient bytes of one layer's pass (one layer at a time)


def _allgather_softmax(W: int, kv: float, g: float, t_attn: float, t_diag: float, hw: Hardware) -> SoftmaxCost:
    gather = (W - 1) * (hw.latency + kv / hw.bandwidth)
    return SoftmaxCost(2 * max(0.0, gather - t_diag), 2 * (W - 1) * kv, W * kv, W * kv)


def _ring_softmax(W: int, kv: float, g: float, t_attn: float, t_diag: float, hw: Hardware) -> SoftmaxCost:
    step, hop = t_attn / W, hw.latency + hw.hop_overhead       # every step waits for its block: a dependent hop
    forward = (W - 1) * (hop + max(0.0, kv / hw.bandwidth - step))
    backward = (W - 1) * (hop + max(0.0, (kv + g) / hw.bandwidth - 2 * step)) + hop + g / hw.bandwidth
    return SoftmaxCost(forward + backward, 2 * (W - 1) * kv + W * g, 0.0, 2 * kv + 2 * g)


SOFTMAX_COSTS = {"allgather": _allgather_softmax, "ring": _ring_softmax}   # by lsp.names.SOFTMAX_SP_METHODS


def softmax_exchange_cost(method: str, world_size: int, kv_bytes: float, t_attention: float, t_diagonal: float,
                          hw: Hardware | None = None) -> SoftmaxCost:
    """Communication and K|V memory of one softmax layer's SP method for one training step (formulas above):
    kv_bytes the rank's local K|V, t_attention its forward attention compute, t_diagonal its causal diagonal."""
    if method not in SOFTMAX_COSTS:
        raise ValueError(f"softmax method must be one of {tuple(SOFTMAX_COSTS)}, got {method!r}")
    hw = hw or Hardware()
    if world_size == 1:
        return SoftmaxCost(0.0, 0.0, 0.0, 0.0)
    g = kv_bytes * 4 / hw.act_bytes
    return SOFTMAX_COSTS[method](world_size, kv_bytes, g, t_attention, t_diagonal, hw)


# ------------------------------------------------------------------------------------------- delta-rule layers
#
# A delta-rule layer (lsp.parallel.delta) exchanges affine maps, not decayed states, and cannot overlap: its prefix
# needs the composed map [M_i | S_i] of every earlier segment, which only the whole local chunk scan yields, and its
# outputs need the entering state. Per layer and pass (forward, and the mirror backward), with s = b·H·K·V·4 the
# state, m = b·H·K·(K + V)·4 a segment's [M | S] (backward [M | gE], the same size) and n = (W-1)·L chain edges that
# cross ranks (the zigzag chain visits rank W-1 twice in a row):
#
#   allgather  one all_gather of L·m per rank: (W-1)·(α + L·m/β) + the local prefix (3·W·L·m at HBM bandwidth),
#              bytes (W-1)·L·m                                            = exchange_time("allgather", m, overlap 0)
#   ring       the chain through all n edges, blocking: as linear ring    = exchange_time("ring", s), bytes n·s/W
#   allscan    the same chain in n_b blocks along V, each block sent as soon as it is computed:
#              (n + n_b - 1)·(α + s/(n_b·β)), bytes n·s/W (zigzag: no half chains, no tree, unlike linear All-Scan)
#   + the short-conv halo: one all_gather of every held segment's last k-1 inputs (h = b·(k-1)·3·H·Dh activation
#              bytes), forward and its gradient backward: (W-1)·(α + L·h/β), bytes (W-1)·L·h.
#
# FLOPs per token and head of the chunked delta rule (lsp.ops.delta.chunk), counting its matmuls as FlopCounterMode
# does (2 per multiply-add; the UT transform's triangular solves, C·(K + V) each way, are not matmuls and are not
# counted). Forward: K Kᵀ in the UT transform 2CK, the chunk scan (W = U - Wk S, Kdᵀ W) 4KV, the output
# (q Kᵀ, P U, P Wk, (q - P Wk) E) 4CK + 2CV + 2KV. Backward: both operands of every matmul 2 x that, plus the solve's
# matrix gradient 2C(K + V), less 10KV/NC at the row's edges (no gradient into the zero first state or out of the
# unused final state; NC chunks per row). The SP path adds, per token and head: the scan on the augmented state
# [M | S], K + V columns instead of V (4·K·K forward), and entering every chunk with S_c + P_c E (2·K·K·V / C),
# backward twice that; per segment (not per token) the prefix composition and the final states, 2·K·K·V each.


def delta_exchange_time(method: str, world_size: int, heads: int, key_dim: int, value_dim: int,
                        hw: Hardware | None = None, *, layout: str = "contiguous", halo_bytes: float = 0.0,
                        scan_blocks: int | None = None) -> tuple[float, float]:
    """(exposed seconds, bytes received per GPU) of one delta-rule layer's exchange in one pass; heads = b·H
    (batch rows times heads), halo_bytes = one segment's conv halo b·(k-1)·3·H·Dh·act_bytes. Formulas above."""
    hw, W = hw or Hardware(), world_size
    if method not in SP_METHODS:
        raise ValueError(f"method must be one of {SP_METHODS}, got {method!r}")
    if W == 1:
        return 0.0, 0.0
    L = 2 if layout == "zigzag" else 1
    state = heads * key_dim * value_dim * hw.state_bytes
    maps = heads * key_dim * (key_dim + value_dim) * hw.state_bytes
    halo = ((W - 1) * (hw.latency + L * halo_bytes / hw.bandwidth), (W - 1) * L * halo_bytes)
    if method == "allgather":
        t, b = exchange_time("allgather", W, maps, 0.0, hw, layout=layout)
    elif method == "ring":
        t, b = exchange_time("ring", W, state, 0.0, hw, layout=layout)
    else:
        nb = scan_blocks or best_delta_scan_blocks(W, state, hw, layout=layout)
        t, b = _delta_chain(W, state, hw, L, nb), (W - 1) * L * state / W
    return t + halo[0], b + halo[1]


def _delta_chain(W: int, state: float, hw: Hardware, L: int, nb: int) -> float:
    # the delta All-Scan chain: (W-1)·L dependent edges pipelined in nb blocks, nothing to hide behind
    return ((W - 1) * L + nb - 1) * (hw.latency + state / (nb * hw.bandwidth))


def best_delta_scan_blocks(world_size: int, state_bytes: float, hw: Hardware | None = None, *,
                           layout: str = "contiguous") -> int:
    """The delta All-Scan block count n_b (of BLOCK_CHOICES) with the least time; the smallest on a tie."""
    hw, L = hw or Hardware(), 2 if layout == "zigzag" else 1
    times = {nb: _delta_chain(world_size, state_bytes, hw, L, nb) for nb in BLOCK_CHOICES}
    return min(nb for nb, t in times.items() if t <= min(times.values()) * (1 + 1e-9))


def delta_flops_per_token(chunk_size: int, key_dim: int, value_dim: int, chunks_per_row: int) -> tuple[float, float]:
    """(forward, backward) FLOPs per token and head of `lsp.ops.delta_rule` on the chunked torch path, as
    FlopCounterMode counts them, for rows of chunks_per_row whole chunks (formulas above)."""
    C, K, V = chunk_size, key_dim, value_dim
    return 6 * C * K + 2 * C * V + 6 * K * V, 14 * C * K + 6 * C * V + 12 * K * V - 10 * K * V / chunks_per_row


def delta_sp_flops_per_token(key_dim: int, value_dim: int, chunk_size: int) -> float:
    """Forward FLOPs per token and head that a delta-rule layer's SP path adds to the op's (formulas above)."""
    return 4 * key_dim * key_dim + 2 * key_dim * key_dim * value_dim / chunk_size


__all__ = ["ModelSpec", "Hardware", "StepTime", "exchange_time", "best_scan_blocks", "step_time", "plan",
           "format_plan", "ratio", "METHODS", "LABELS", "delta_exchange_time", "best_delta_scan_blocks",
           "delta_flops_per_token", "delta_sp_flops_per_token", "SoftmaxCost", "SOFTMAX_COSTS",
           "softmax_exchange_cost"]
