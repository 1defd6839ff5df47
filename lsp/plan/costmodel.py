"""Analytic step-time model of sequence-parallel linear attention: the three lsp exchanges, plus ring-KV.

One training step (forward + backward) of a pure linear-attention LM on W GPUs, T tokens, batch 1, per GPU:

    compute   = 3 · FLOPs_fwd(T/W) / F                         (backward = 2 × forward)
    step      = compute + Σ_layers Σ_{fwd, bwd} exposed_comm(method)

with s = H·K·V·state_bytes the state of one layer, d = H·K_g·4 its total decay (K_g = K per-key, 1 scalar), β the
per-GPU bandwidth, α the per-message latency, F the sustained kernel throughput, L the segments per rank (1
contiguous, 2 zigzag). Per layer and pass (forward, and once more backward), exactly what the method does (bytes:
the per-rank average that comm_stats() counts). Each formula is registered with its method (lsp.parallel.methods,
`cost`); `exchange_time` looks it up, so a new method is priced by its own formula:

* ring (LASP-1): one chain through all segments, (W-1)·L dependent hops; each hop receives the state, updates it
  and sends it on, blocking, nothing overlaps: (W-1)·L · (α + s/β + t_update + γ), t_update = 3·s / HBM
  bandwidth, γ = the synchronisation / kernel launch a dependent hop costs. Bytes (W-1)·L·s/W.
* allgather (LASP-2): one all-gather of L·(s + d) per rank (forward: states and decays; backward: gradients and
  decays again), (W-1)·(α + L·(s+d)/β), overlapped with the local intra-chunk compute of that pass, plus the local
  prefix over the W·L segments (3·W·L·s bytes at HBM bandwidth). Bytes (W-1)·L·(s + d).
* allscan (ZeCO All-Scan), n_b = scan_blocks blocks along V, each hop an elementwise update, overlapped with the
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

from dataclasses import asdict, dataclass, field

from lsp.names import SCAN_BLOCKS
from lsp.parallel.methods import SCAN_BLOCK_CHOICES, sp_method, sp_methods
from lsp.parallel.softmax import SoftmaxCost, softmax_method

RINGKV = "ringkv"   # ring attention applied to linear layers: priced here for comparison, not an lsp method
METHODS = (*sp_methods(), RINGKV)   # the registered lsp exchanges + ring-KV
LABELS = {**{m: sp_method(m).label for m in sp_methods()}, RINGKV: "ring-KV"}
BLOCK_CHOICES = SCAN_BLOCK_CHOICES


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
    backward): the registered method's cost formula (lsp.parallel.methods); state_bytes is the whole [B, H, K, V]
    state, decay_bytes its map as it travels (the total decay [B, H, K_g]; K × K for a dense map), t_overlap the
    local intra-chunk compute an asynchronous exchange hides behind, scan_blocks the pipeline blocks (None: the
    method's best). An unknown method raises."""
    return sp_method(method).cost(world_size, state_bytes, decay_bytes, t_overlap, hw or Hardware(), layout,
                                  scan_blocks)


def best_scan_blocks(world_size: int, state_bytes: float, t_overlap: float, hw: Hardware | None = None, *,
                     layout: str = "contiguous", method: str | None = None, map_bytes: float = 0.0) -> int:
    """The pipeline block count (of SCAN_BLOCK_CHOICES) with the least exposed time for `method` (None: the first
    registered method that has blocks); the smallest on a tie, SCAN_BLOCKS when nothing is exposed."""
    entry = sp_method(method) if method else next(sp_method(n) for n in sp_methods() if sp_method(n).blocks)
    hw = hw or Hardware()
    best = min(entry.cost(world_size, state_bytes, map_bytes, t_overlap, hw, layout, nb)[0]
               for nb in SCAN_BLOCK_CHOICES)
    if best <= 0:
        return SCAN_BLOCKS
    return entry.best_blocks(world_size, state_bytes, map_bytes, t_overlap, hw, layout)


def step_time(method: str, world_size: int, seq_len: int, m: ModelSpec | None = None,
              hw: Hardware | None = None, layout: str = "contiguous") -> StepTime:
    """Modelled fwd+bwd step time of one method; see the module docstring for the formulas."""
    if method != RINGKV:
        sp_method(method)   # an unknown name raises
    m, hw = m or ModelSpec(), hw or Hardware()
    W, T_loc = world_size, seq_len / world_size
    flops_token, intra_token = _flops_fwd_per_token(m)
    compute = 3 * flops_token * T_loc / hw.flops
    t_intra = intra_token * T_loc / hw.flops            # per layer and pass: hides an asynchronous exchange
    H, K = m.num_heads, m.head_dim
    s = H * K * K * hw.state_bytes
    if W == 1:
        return StepTime(method, compute, 0.0, 0.0)
    if method == RINGKV:
        kv = 2 * T_loc * H * K * hw.act_bytes
        block = 2 * 2 * T_loc * H * K * K / hw.flops
        per_pass = (W - 1) * max(0.0, hw.latency + kv / hw.bandwidth - block)
        bytes_pass = (W - 1) * kv
    else:
        per_pass, bytes_pass = exchange_time(method, W, s, t_intra, hw, layout=layout)
    passes = 2 * m.num_layers
    return StepTime(method, compute, passes * per_pass, passes * bytes_pass)


def plan(world_size: int, seq_len: int, *, model: ModelSpec | None = None, hardware: Hardware | None = None,
         methods=None) -> list[dict]:
    """Modelled step time of every method, fastest first: [{method, label, compute_s, comm_exposed_s,
    comm_bytes_per_gpu, total_s, tokens_per_s, speedup_vs_slowest}].

    `lsp plan` prints this. Example: plan(256, 8 * 2**20) ranks All-Scan first, ~1.6x faster than LASP-2.
    """
    if world_size < 1 or seq_len < world_size:
        raise ValueError(f"need world_size >= 1 and seq_len >= world_size, got {world_size}, {seq_len}")
    methods = (*sp_methods(), RINGKV) if methods is None else methods   # every registered method, read now
    rows = [asdict(step_time(mth, world_size, seq_len, model, hardware)) for mth in methods]
    slowest = max(r["total_s"] for r in rows)
    for r in rows:
        r["label"] = LABELS[r["method"]] if r["method"] == RINGKV else sp_method(r["method"]).label
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


def softmax_exchange_cost(method: str, world_size: int, kv_bytes: float, t_attention: float, t_diagonal: float,
                          hw: Hardware | None = None) -> SoftmaxCost:
    """Communication and K|V memory of one softmax layer's SP method for one training step (formulas above):
    kv_bytes the rank's local K|V, t_attention its forward attention compute, t_diagonal its causal diagonal."""
    entry = softmax_method(method)   # the formula registered with the method; an unknown name raises
    hw = hw or Hardware()
    if world_size == 1:
        return SoftmaxCost(0.0, 0.0, 0.0, 0.0)
    g = kv_bytes * 4 / hw.act_bytes
    return entry.cost(world_size, kv_bytes, g, t_attention, t_diagonal, hw)


# ------------------------------------------------------------------------------------------- delta-rule layers
#
# A delta-rule layer (lsp.parallel.delta) runs the same registered methods over dense K × K maps (lsp.parallel.affine)
# and cannot overlap: its prefix needs the map M_i of every earlier segment, which only the whole local chunk scan
# yields, and its outputs need the entering state. Per layer and pass (forward, and the mirror backward), with
# s = b·H·K·V·4 the state and m = b·H·K·K·4 the map as it travels, each method's own cost formula with no overlap:
#
#   allgather  [S | M] forward, [gE | M] backward: bytes (W-1)·L·(s + m)
#   ring       the state through every chain edge that crosses ranks: bytes (W-1)·L·s/W
#   allscan    contiguous as the ring, pipelined in n_b blocks along V; zigzag the two half chains (the second also
#              sending its composed map m) and the tree broadcast: bytes (W-1)·(3s + m)/W
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
    state = heads * key_dim * value_dim * hw.state_bytes
    dense_map = heads * key_dim * key_dim * hw.state_bytes
    t, b = exchange_time(method, W, state, 0.0, hw, layout=layout, decay_bytes=dense_map, scan_blocks=scan_blocks)
    if W == 1:
        return t, b
    L = 2 if layout == "zigzag" else 1
    return t + (W - 1) * (hw.latency + L * halo_bytes / hw.bandwidth), b + (W - 1) * L * halo_bytes


def best_delta_scan_blocks(world_size: int, state_bytes: float, hw: Hardware | None = None, *,
                           layout: str = "contiguous", map_bytes: float | None = None) -> int:
    """The delta All-Scan block count n_b with the least time (nothing to hide behind); the smallest on a tie.
    map_bytes: the K × K map the zigzag half chain sends (None: K = V, the size of the state)."""
    return best_scan_blocks(world_size, state_bytes, 0.0, hw, layout=layout,
                            map_bytes=state_bytes if map_bytes is None else map_bytes)


def delta_flops_per_token(chunk_size: int, key_dim: int, value_dim: int, chunks_per_row: int) -> tuple[float, float]:
    """(forward, backward) FLOPs per token and head of `lsp.ops.delta_rule` on the chunked torch path, as
    FlopCounterMode counts them, for rows of chunks_per_row whole chunks (formulas above)."""
    C, K, V = chunk_size, key_dim, value_dim
    return 6 * C * K + 2 * C * V + 6 * K * V, 14 * C * K + 6 * C * V + 12 * K * V - 10 * K * V / chunks_per_row


def delta_sp_flops_per_token(key_dim: int, value_dim: int, chunk_size: int) -> float:
    """Forward FLOPs per token and head that a delta-rule layer's SP path adds to the op's (formulas above)."""
    return 4 * key_dim * key_dim + 2 * key_dim * key_dim * value_dim / chunk_size


# The DPLR rule (RWKV-7) in the delta rule's chunk form with 2C rows: its op's FLOPs are
# `lsp.ops.dplr.chunk.dplr_flops_per_token` (beside the code it counts, which the layer's MFU count reads too). The
# SP path's augmented scan runs on the 2C rows: 8·K·K forward per token instead of the delta rule's 4·K·K, with the
# same entering term (2·K·K·V / C), backward twice that plus the first chunk's 20KV/NC, as the delta rule's model.


def dplr_sp_flops_per_token(key_dim: int, value_dim: int, chunk_size: int) -> float:
    """Forward FLOPs per token and head that a DPLR layer's SP path adds to the op's (formulas above)."""
    return 8 * key_dim * key_dim + 2 * key_dim * key_dim * value_dim / chunk_size


# ------------------------------------------------------------------------------ baselines outside lsp (bytes only)
#
# Bytes received per rank for one linear layer and one training step (forward + backward), by the accounting of
# `exchange_time` (what arrives at a rank), for two SP designs lsp does not run (docs/benchmarks_scale.md):
#
#   fla context parallelism    every rank all-gathers the others' K × (K + V) per head ([M | S]: the segment map
#                              and state; the backward gathers the same again): 2·(W-1)·b·H·K·(K+V)·state_bytes
#   Megatron head all-to-all   (DeepSpeed-Ulysses / Megatron's a2a context parallel) the layer's inputs leave in
#                              token shards and arrive in head shards, its output goes back: every rank receives
#                              (W-1)/W of its local q, k, v, o, 2·(W-1)/W·t·H·(3·K + V)·act_bytes a step (backward:
#                              their gradients the same way); gates and β add at most H·K per token more (left
#                              out). Needs W <= H: heads are what it splits.


def fla_cp_bytes(world_size: int, heads: int, key_dim: int, value_dim: int, state_bytes: int = 4) -> float:
    """Bytes one rank receives for one linear layer, forward + backward, under fla's context parallelism: an
    all-gather of every rank's K·(K+V) per head (heads = b·H), 2·(W-1)·heads·K·(K+V)·state_bytes."""
    return 2 * (world_size - 1) * heads * key_dim * (key_dim + value_dim) * state_bytes


def megatron_a2a_bytes(world_size: int, local_tokens: int, heads: int, key_dim: int, value_dim: int,
                       act_bytes: int = 2) -> float:
    """Bytes one rank receives for one layer, forward + backward, under Megatron's head all-to-all (Ulysses):
    (W-1)/W of its local q, k, v and o each way, 2·(W-1)/W·t·H·(3·K + V)·act_bytes (W <= H)."""
    W = world_size
    return 2 * (W - 1) / W * local_tokens * heads * (3 * key_dim + value_dim) * act_bytes


__all__ = ["ModelSpec", "Hardware", "StepTime", "exchange_time", "best_scan_blocks", "step_time", "plan",
           "format_plan", "ratio", "METHODS", "LABELS", "delta_exchange_time", "best_delta_scan_blocks",
           "delta_flops_per_token", "delta_sp_flops_per_token", "SoftmaxCost",
           "softmax_exchange_cost", "fla_cp_bytes", "megatron_a2a_bytes"]
