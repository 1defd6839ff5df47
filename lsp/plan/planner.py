"""`lsp plan`: choose SP size, SP method, micro-batch and activation checkpointing for a config on a cluster.

The planner enumerates every candidate (sp, method, micro_batch, activation checkpointing) for N GPUs, keeps the
global batch of the config fixed (micro_batch · grad_accum · dp sequences; dp = N / sp, so grad_accum adapts),
models the step time and the memory per GPU of each, and recommends the fastest candidate that fits in memory.
It is a model (no GPU is touched): treat absolute numbers as an order of magnitude, the ranking as the result.

Step time of one optimizer step, per GPU (T = seq_len, b = micro_batch, t = b · T / sp local tokens):

    micro   = compute + Σ_L layers exchange_L + Σ_S layers exchange_S
    compute = (1 + ac/3) · flops_per_token(cfg, T) · t / F         (activation checkpointing re-runs the forward)
    exchange_L (per pass, forward and backward): lsp.plan.costmodel.exchange_time(method, sp, b·H·K·V·4 bytes,
              t_intra, layout, decay b·H·K_g·4 bytes, scan_blocks) - the cost formula registered with each SP
              method (lsp.parallel.methods; every registered method is a candidate), with the block count of a
              method that has blocks chosen by the model; kinds whose segment map A is dense (the delta rule):
              costmodel.delta_exchange_time (K x K maps, nothing overlapped, plus the short-conv halo) and, for
              sp > 1, delta_sp_flops_per_token more compute. The kind (`lsp.models.layer_kind`) gives its payload
              and the form of A (`OP_FAMILIES`)
    exchange_S (forward + backward): costmodel.softmax_exchange_cost for the softmax method, kv = 2·t·Hkv·Dh·2
              bytes: LASP-2H all-gathers K,V forward and reduces their gradients backward, each (sp-1)·(α + kv/β)
              overlapped with the rank's local diagonal block; ring attention passes kv around the ring behind
              each step's attention (sp - 1 hops, at least α exposed each), backward kv and the fp32 dK|dV. The
              planner tries both per candidate: LASP-2H keeps the gathered K|V (4·Hkv·Dh bytes per global token
              per softmax layer), ring none of it, so at long sequences ring fits where LASP-2H does not
    step    = grad_accum · micro + max(0, allreduce_dp - backward of one micro-step)
              (ring all-reduce of the bf16 gradients over dp, 2·(dp-1)/dp · P · 2 bytes, overlapped with backward)

β is NVLink inside a node (the SP group is placed on consecutive ranks, so sp <= gpus_per_node stays inside one)
and the network across nodes. Memory per GPU:

    states      16 bytes/parameter (fp32 weight, gradient, AdamW m and v), sharded by the engine over all
                n = dp·sp ranks: the engine class's `state_bytes_per_param` (lsp/engines.py, which tabulates them)
    activations what autograd keeps on rank 0, counted tensor by tensor (saved-tensor hooks on fake tensors, bf16
                autocast, the chunked torch path of the linear layers) and written out in `saved_bytes`, per layer
                (D hidden, F SwiGLU width, H heads of Dh, Hkv key heads, C chunk, r GLA's gate rank; a linear
                layer's own terms are its kind's `saved_bytes`):
                  both kinds: 20·D + 8·F + 8 per token (two RMSNorms, SwiGLU in bf16)
                  softmax:    6·D + 6·H·Dh + 4·Hkv·Dh + 16·Dh + 4·H per token (projection inputs, q, k, v,
                              o, RoPE tables, log-sum-exp), under SP with LASP-2H + the gathered bf16 K|V,
                              4·Hkv·Dh per global token (ring attention: nothing more)
                  GLA:        10·D + 24·H·Dh + 4·H + 2·r per token (+ 6·H·Dh under zigzag SP: the incoming-
                              state correction) + 50·H·Dh + 4·H·C + 4·H·Dh/C + 8·H·Dh²/C per padded token
                              (every segment padded to whole chunks: the fp32 chunk core) + 4·H·Dh² per held
                              segment under SP
                  delta rule: 8·D + 66·H·Dh + 30·H + 6 per token + 52·H·Dh + 28·H·C + 16·H + 24·H·Dh²/C per
                              padded token + 16·H·Dh² per held segment under SP
                plus a bf16 copy of every weight (autocast), 12·D + 12 per token and 4·vocab·D for the head
                (embedding ids, final norm, the fused cross-entropy's fp32 gradients). With checkpointing only
                each block's input (4·D per token) is kept, plus one block's full activations while it is
                recomputed.
    reserve     `Cluster.reserve_gb` for the CUDA context, NCCL buffers, the cross-entropy chunk and fragmentation.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from itertools import product
from typing import Callable, List, Optional

from lsp.engines import engine_spec
from lsp.models import layer_kind
from lsp.models.flops import expert_parameters, flops_per_token, linear_layer_parameters, matmul_parameters
from lsp.names import CHUNK_SIZE as LINEAR_CHUNK
from lsp.names import DEFAULT_SOFTMAX_METHOD, SCAN_BLOCKS
from lsp.ops.dplr import dplr_flops_per_token
from lsp.parallel.methods import sp_method, sp_methods
from lsp.parallel.softmax import softmax_methods as registered_softmax_methods
from lsp.run_config import Config, ConfigError, hybrid_config

from .costmodel import (
    Hardware,
    best_scan_blocks,
    delta_exchange_time,
    delta_flops_per_token,
    delta_sp_flops_per_token,
    dplr_sp_flops_per_token,
    exchange_time,
    softmax_exchange_cost,
)

GB = 1e9


@dataclass
class Cluster:
    gpus: int
    gpus_per_node: int = 8
    memory_gb: float = 80.0           # per GPU (H100 80GB)
    tflops: float = 400.0             # sustained bf16 kernel throughput per GPU, as in lsp.plan.costmodel
    nvlink_gbps: float = 150.0        # GB/s per GPU inside a node
    network_gbps: float = 18.0        # GB/s per GPU across nodes (the costmodel's fitted β)
    reserve_gb: float = 6.0           # CUDA context, NCCL buffers, CE chunk, allocator fragmentation

    @property
    def dp_gbps(self) -> float:
        """Bandwidth of the data-parallel gradient all-reduce: across nodes as soon as the job spans nodes."""
        return self.nvlink_gbps if self.gpus <= self.gpus_per_node else self.network_gbps

    def hardware(self, sp: int) -> Hardware:
        inside = sp <= self.gpus_per_node
        return Hardware(flops=self.tflops * 1e12, bandwidth=(self.nvlink_gbps if inside else self.network_gbps) * GB)


@dataclass
class Candidate:
    sp: int
    dp: int
    method: str
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    step_s: float
    compute_s: float
    comm_s: float
    memory_gb: float
    tokens_per_s_per_gpu: float
    fits: bool
    scan_blocks: int = SCAN_BLOCKS   # pipeline blocks (the model's best, for a method that has them: All-Scan)
    softmax_method: str = DEFAULT_SOFTMAX_METHOD  # the softmax layers' SP method (LASP-2H or ring attention)

    def overrides(self) -> str:
        blocks = f" parallel.scan_blocks={self.scan_blocks}" if sp_method(self.method).blocks else ""
        return (f"parallel.sp={self.sp} parallel.dp={self.dp} parallel.sp_method={self.method}{blocks} "
                f"parallel.softmax_method={self.softmax_method} "
                f"train.micro_batch={self.micro_batch} train.grad_accum={self.grad_accum} "
                f"train.activation_checkpointing={str(self.checkpointing).lower()}")


def model_parameters(mcfg) -> int:
    """Every parameter of HybridLM: the matmul weights, the embedding (untied), RMSNorm weights (two per block,
    the final one) and each linear layer's other parameters (its kind's `other_parameters`: output norm, biases,
    short convolutions, per-head constants)."""
    D, types = mcfg.hidden_size, mcfg.layer_types
    linear = linear_layer_parameters(mcfg)[1]
    small = 2 * D * len(types) + D + linear
    # every MoE expert (active=False): memory holds all of them, a token uses top-k
    return matmul_parameters(mcfg, active=False) + (0 if mcfg.tie_embeddings else mcfg.vocab_size * D) + small


def layer_keys(mcfg) -> list:
    """One key per layer, what the per-layer formulas are looked up by: "S" (softmax) or its linear kind's name
    (`HybridConfig.position_kinds`: layer_pattern may mix kinds)."""
    return ["S" if kind is None else kind for kind in mcfg.position_kinds]


def _linear_kind(mcfg, key: str) -> str:
    # a layer key of a linear layer -> its kind; "L" is the shorthand for the config's linear_attn
    return mcfg.linear_attn if key == "L" else key


def _layer_weights(mcfg, key: str) -> int:
    # weights of one layer's matmuls (key "S" or a linear kind / "L"): bf16 autocast keeps a copy of each
    D, F, H, Hkv, Dh = (mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_heads, mcfg.num_kv_heads,
                        mcfg.head_dim)
    if key == "S":
        return 2 * D * H * Dh + 2 * D * Hkv * Dh + 3 * D * F
    return layer_kind(_linear_kind(mcfg, key)).matmul_weights(mcfg) + 3 * D * F


def saved_bytes(mcfg, kind: str, backend: str = "torch") -> dict:
    """Bytes autograd keeps for one layer of `kind` ("S", a linear kind's name, or "L": linear_attn) under bf16
    autocast, split by what they scale with; counted tensor by tensor with saved-tensor hooks on fake tensors
    (module docstring) and written out:

        token   per local token    norms, bf16 input copies of every projection, SwiGLU, the layer's own tensors
        padded  per padded token   the chunked linear-attention core (each segment padded to whole chunks)
        segment per held segment   (and batch row) of an SP rank: the entering states kept for backward
        keys    per global token   softmax under SP: the all-gathered bf16 K|V buffer
    backend: the path of the linear layers' recurrence, "torch" (chunked) or "triton" (the custom ops); a linear
    layer's own terms are its kind's `saved_bytes`. D hidden, F SwiGLU width, H heads of Dh, Hkv key heads."""
    D, F, H, Hkv, Dh = (mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_heads, mcfg.num_kv_heads,
                        mcfg.head_dim)
    mlp_and_norms = 20 * D + 8 * F + 8           # two RMSNorms (input, statistics, output), SwiGLU in bf16
    if kind == "S":                               # q/k/v input copies, RoPE tables, q, k, v, o, o_proj input, lse
        return {"token": mlp_and_norms + 6 * D + 6 * H * Dh + 4 * Hkv * Dh + 16 * Dh + 4 * H, "padded": 0,
                "segment": 0, "keys": 4 * Hkv * Dh}
    own = layer_kind(_linear_kind(mcfg, kind)).saved_bytes(mcfg, backend)
    return {**own, "token": mlp_and_norms + own["token"]}


def linear_backend(mcfg, kind: Optional[str] = None) -> str:
    """The path `lsp plan --measure` runs a linear layer of `kind` (None: linear_attn) on (its recurrence family's
    `backend`)."""
    cls = layer_kind(_linear_kind(mcfg, kind) if kind is not None else mcfg.linear_attn)
    return op_family(mcfg, kind).backend() if cls.has_kernels else "torch"


def local_segments(seq_len: int, local_tokens: int, micro_batch: int, layout: str) -> tuple[int, int]:
    """(held segments, tokens of each) of rank 0: zigzag holds 2 under SP, contiguous and no SP one."""
    sp = max(1, micro_batch * seq_len // local_tokens)
    held = 2 if layout == "zigzag" and sp > 1 else 1
    return held, local_tokens // micro_batch // held


def layer_activation_bytes(mcfg, kind: str, seq_len: int, local_tokens: int, micro_batch: int,
                           layout: str = "zigzag", softmax_method: str = DEFAULT_SOFTMAX_METHOD) -> float:
    """Bytes one layer of `kind` keeps for backward on rank 0: `saved_bytes` at the launch's token counts (the
    gathered K|V only where the softmax method keeps it: costmodel.softmax_exchange_cost), plus a bf16 copy of
    each of its weights (autocast)."""
    sp = max(1, micro_batch * seq_len // local_tokens)
    held, Ts = local_segments(seq_len, local_tokens, micro_batch, layout)
    padded = micro_batch * held * -(-Ts // LINEAR_CHUNK) * LINEAR_CHUNK
    b = saved_bytes(mcfg, kind, linear_backend(mcfg, None if kind == "S" else _linear_kind(mcfg, kind)))
    sharded = sp > 1
    incoming = b.get("incoming", 0) if sharded and layout == "zigzag" else 0
    keys = softmax_exchange_cost(softmax_method, sp, b["keys"] * local_tokens, 0.0, 0.0).kept
    return ((b["token"] + incoming) * local_tokens + b["padded"] * padded
            + sharded * (b["segment"] * micro_batch * held + keys) + 2 * _layer_weights(mcfg, kind))


def activation_bytes(mcfg, seq_len: int, local_tokens: int, micro_batch: int, checkpointing: bool,
                     layout: str = "zigzag", softmax_method: str = DEFAULT_SOFTMAX_METHOD, ep: int = 1) -> float:
    """Bytes of activations kept for backward on rank 0 (module docstring), plus the K|V working set of one
    softmax layer's SP pass (LASP-2H: the gathered K|V's gradient; ring: two blocks and two dK|dV accumulators).
    An MoE block's feed-forward replaces the dense SwiGLU's terms (lsp.plan.moe: experts split over ep ranks)."""
    from .moe import moe_saved_per_token, moe_weight_copies

    D, V = mcfg.hidden_size, mcfg.vocab_size
    keys = layer_keys(mcfg)
    layer = {key: layer_activation_bytes(mcfg, key, seq_len, local_tokens, micro_batch, layout, softmax_method)
             for key in set(keys)}
    types = mcfg.layer_types
    moe = moe_saved_per_token(mcfg) * local_tokens + moe_weight_copies(mcfg, ep) if mcfg.moe_experts else 0.0
    layers = [layer[key] + (moe if mcfg.is_moe_layer(i) else 0.0) for i, key in enumerate(keys)]
    sp = max(1, micro_batch * seq_len // local_tokens)
    kv_local = 4 * mcfg.num_kv_heads * mcfg.head_dim * local_tokens            # bf16 K and V of the local tokens
    workspace = softmax_exchange_cost(softmax_method, sp, kv_local, 0.0, 0.0).workspace if "S" in types else 0.0
    # embedding ids, final norm, the fused cross-entropy's fp32 input gradient and weight gradient
    head = (12 * D + 12) * local_tokens + 4 * V * D + workspace
    if not checkpointing:
        return head + sum(layers)
    return head + 4 * D * local_tokens * len(types) + max(layers)


def counted_flops(mcfg, seq_len: int, local_tokens: int, micro_batch: int, checkpointing: bool,
                  layout: str = "zigzag") -> float:
    """FLOPs of one micro-step of rank 0 as torch's FlopCounterMode counts them (what `lsp plan --measure`
    reports): 2 per multiply-add of every matmul (6·N_matmul per token; checkpointing recomputes each block's
    forward up to the last tensor backward needs, i.e. all but the MLP's down_proj; the LM head is not
    checkpointed); softmax attention at torch's SDPA formulas, full score blocks (4·H·Dh per scored pair forward,
    10 backward, causal or not) over the key blocks rank 0 scores; linear attention on the chunked torch path
    (`linear_core_flops`), forward one third."""
    D, H, Dh, types = mcfg.hidden_size, mcfg.num_heads, mcfg.head_dim, mcfg.layer_types
    sp, ac = max(1, micro_batch * seq_len // local_tokens), int(checkpointing)
    blocks = sum(_layer_weights(mcfg, key) for key in layer_keys(mcfg))
    recomputed = blocks - len(types) * D * mcfg.intermediate_size   # the recompute stops before down_proj
    matmul = (6 * blocks + 2 * ac * recomputed + 6 * mcfg.vocab_size * D) * local_tokens
    if mcfg.moe_experts:   # MoE blocks: router, top-k and shared experts instead of the dense SwiGLU
        from .moe import moe_flops_per_token, moe_layer_count

        matmul += moe_layer_count(mcfg) * moe_flops_per_token(mcfg, checkpointing) * local_tokens
    linear = sum(n * linear_flops(mcfg, seq_len, local_tokens, micro_batch, ac, layout, kind)
                 for kind, n in mcfg.linear_kind_counts().items())
    _, seg = local_segments(seq_len, local_tokens, micro_batch, layout)
    rows = {1: seq_len * seq_len}.get(sp, seg * seg * (2 * sp + 1 if layout == "zigzag" else 1))
    softmax = types.count("S") * (14 + 4 * ac) * H * Dh * micro_batch * rows
    return matmul + linear + softmax


def linear_flops(mcfg, seq_len: int, local_tokens: int, micro_batch: int, ac: int, layout: str,
                 kind: Optional[str] = None) -> float:
    """FLOPs FlopCounterMode counts for one linear layer's attention (forward, backward, checkpoint recompute), of
    `kind` (None: linear_attn).
    Torch path: `linear_core_flops`, forward one third. Triton path: the custom ops' formulas
    (`lsp.ops.linear.custom_ops.chunk_flops`: S states, O output per pass; backward 2x plus a recomputed states
    scan per piece, two pieces under SP, the whole op without) and, under SP, the incoming-state correction's
    einsums on the segments that receive a state (2·K·V per token forward, twice that backward)."""
    return op_family(mcfg, kind).counted_flops(mcfg, seq_len, local_tokens, micro_batch, ac, layout, kind)


def _decayed_counted_flops(mcfg, seq_len: int, local_tokens: int, micro_batch: int, ac: int, layout: str,
                           kind: Optional[str] = None) -> float:
    # linear_flops of a kind whose segment map is a scalar / diagonal decay (the linear_attention op), K x V states
    H, (K, V) = mcfg.num_heads, layer_kind(kind or mcfg.linear_attn).state_dims(mcfg)
    sp = max(1, micro_batch * seq_len // local_tokens)
    held, seg = local_segments(seq_len, local_tokens, micro_batch, layout)
    if _measured_backend("linear_attention") == "torch":
        chunks = micro_batch * held * -(-seg // LINEAR_CHUNK)
        return H * linear_core_flops(mcfg, chunks, micro_batch * held, kind) * (1 + ac / 3)
    from lsp.ops.linear.custom_ops import chunk_flops

    c = chunk_flops(micro_batch * held, seg, H, K, V)
    S, O = c["states"], c["output"]
    entering = micro_batch * seg * (held - 1 if layout == "zigzag" else 0) if sp > 1 else 0
    return (3 + ac) * (S + O) + (2 if sp > 1 else 1) * S + (3 + ac) * 2 * H * K * V * entering


def linear_core_flops(mcfg, chunks: int, segments: int, kind: Optional[str] = None) -> float:
    """FlopCounterMode's count of one head of a linear-attention layer's chunk core (forward + backward) over
    `chunks` padded chunks of C = 64 tokens in `segments` segments, counted on the chunked torch path at head dims
    32, 64, 128 and one or two chunks per segment and written out (K = V = Dh); the first chunk of a segment
    enters a zero state, hence the per-segment correction (GLA family; the delta rule: `_delta_counted_per_token`):
        chunks · C·(528·Dh + 19.25·Dh²) - segments · 8.5·C·Dh²
    For a kind whose state is K x V (`state_dims`: Mamba-2's N x P) Dh is read as (K + V) / 2 and Dh² as K·V: the
    quadratic terms are K·V matmuls; the linear term's split between K and V is not counted (an approximation)."""
    C, (K, V) = LINEAR_CHUNK, layer_kind(kind or mcfg.linear_attn).state_dims(mcfg)
    return chunks * C * (264 * (K + V) + 19.25 * K * V) - segments * 8.5 * C * K * V


@dataclass(frozen=True)
class ChunkRuleFlops:
    """The counted-FLOP formulas of a rule on the delta rule's chunk form (a dense segment map): what
    `_chunk_rule_counted_flops` needs to count it on either path."""
    heads: Callable[..., int]            # mcfg -> the heads that carry a state (the delta rule: its value heads)
    whole_op: Callable[..., dict]        # (mcfg, kind class) -> the Triton op's formulas per chunk and head: its
    #                                      forward is every part but "grads", its backward every part but "output"
    op_flops: Callable[..., tuple]       # torch path: (forward, backward) per token and head (costmodel / op formula)
    sp_flops: Callable[..., float]       # forward FLOPs per token and head the SP path adds
    edge: int                            # the SP first chunk's edge·K·V / NC in backward
    scan_rows: int                       # rows per chunk of the scan op under SP, in chunks (DPLR: 2C rows)


def _chunk_rule_counted_flops(rule: ChunkRuleFlops, mcfg, seq_len: int, local_tokens: int, micro_batch: int,
                              ac: int, layout: str, kind: Optional[str] = None) -> float:
    # linear_flops of a kind whose segment map is dense (the delta rule, the DPLR rule). Torch path:
    # `_delta_counted_per_token` with the rule's formulas. Triton path (lsp.ops.delta.custom_ops,
    # lsp.ops.dplr.custom_ops): without SP the whole op, its formulas per padded chunk (forward: every part but
    # "grads", backward: every part but "output"); under SP the chunked torch pieces around the scan op, i.e. the
    # torch count with the augmented scan's backward at the op's 12·K·D per padded scan row instead of autograd's
    # 8·K·D, which also skips the gradient of the first chunk's entering state [I | S_0] (2·C·K·D per segment);
    # D = K + V, forward 4·K·D either way. The delta rule counts per value head (q, k are read per value head); a
    # per-key gate (KDA) enters the torch chunk path elementwise only and adds no counted FLOPs there
    # (tests/plan/test_costmodel.py::test_delta_flops_are_what_flopcounter_counts); on the whole Triton op its
    # 16-row score kernels replace some chunk-level products (`delta_chunk_flops(key=True)`)
    H, Dh = rule.heads(mcfg), mcfg.head_dim
    backend = linear_backend(mcfg, kind)
    sp = max(1, micro_batch * seq_len // local_tokens)
    held, seg = local_segments(seq_len, local_tokens, micro_batch, layout)
    chunks = -(-seg // LINEAR_CHUNK)
    if backend == "triton" and sp == 1:
        c = rule.whole_op(mcfg, layer_kind(_linear_kind(mcfg, kind) if kind is not None else mcfg.linear_attn))
        common = sum(v for part, v in c.items() if part not in ("output", "grads"))
        return H * micro_batch * held * chunks * ((1 + ac) * (common + c["output"]) + common + c["grads"])
    per_token = _delta_counted_per_token(Dh, seg, sp, ac, rule.op_flops, rule.sp_flops, rule.edge)
    if backend == "triton":
        from lsp.ops.delta.custom_ops import delta_scan_flops

        fwd, bwd = delta_scan_flops(Dh, 2 * Dh, rule.scan_rows * LINEAR_CHUNK)   # per chunk; autograd's: 2·fwd, less
        per_token += (chunks * (bwd - 2 * fwd) + fwd / 2) / seg                   # fwd / 2
    return H * per_token * local_tokens


def _delta_counted_per_token(Dh: int, seg: int, sp: int, ac: int, op_flops=delta_flops_per_token,
                             sp_flops=delta_sp_flops_per_token, edge: int = 10) -> float:
    # counted FLOPs per token and head of a delta layer (costmodel.delta_flops_per_token, exact on the op;
    # checkpointing re-runs the forward; SP adds the augmented scan and the first chunk's edge·K·V / NC), for
    # segments of seg tokens in whole chunks, with a rule's formulas (`ChunkRuleFlops`)
    C = LINEAR_CHUNK
    chunks = -(-seg // C)
    fwd, bwd = op_flops(C, Dh, Dh, chunks)
    if sp > 1:
        extra = sp_flops(Dh, Dh, C)
        fwd, bwd = fwd + extra, bwd + edge * Dh * Dh / chunks + 2 * extra
    return (fwd * (1 + ac) + bwd) * chunks * C / seg


def linear_exchange(mcfg, hw: Hardware, sp: int, method: str, b: int, t_intra: float, layout: str,
                    scan_blocks: Optional[int] = None, kind: Optional[str] = None) -> tuple:
    """(exposed s, bytes received per GPU, All-Scan blocks) of one linear layer's SP exchange in one pass, for a
    layer of `kind` (None: linear_attn; what it sends: its `state_dims` states and `exchange_payload`);
    scan_blocks None: the model's best."""
    cls = layer_kind(kind or mcfg.linear_attn)
    return op_family(mcfg, kind).exchange(mcfg, hw, sp, method, b, t_intra, layout, scan_blocks, cls)


def _conv_halo(sp: int, halo_bytes: float, hw: Hardware, layout: str) -> tuple[float, float]:
    # a decay kind's short convolutions (`sp_short_conv`), priced as costmodel.delta_exchange_time prices the delta
    # rule's: one all_gather of every held segment's last k-1 inputs per pass, not overlapped; none without a conv
    if not halo_bytes:
        return 0, 0
    L = 2 if layout == "zigzag" else 1
    return (sp - 1) * (hw.latency + L * halo_bytes / hw.bandwidth), (sp - 1) * L * halo_bytes


def _decayed_exchange(mcfg, hw, sp, method, b, t_intra, layout, scan_blocks, kind) -> tuple:
    # states and total decays (a vector per head), overlapped with the intra-chunk compute
    payload, (K, V) = kind.exchange_payload(mcfg, b, hw.act_bytes), kind.state_dims(mcfg)
    state = b * mcfg.num_heads * K * V * hw.state_bytes
    blocks = scan_blocks or SCAN_BLOCKS
    if not scan_blocks and sp > 1 and sp_method(method).blocks:
        blocks = best_scan_blocks(sp, state, t_intra, hw, layout=layout, method=method,
                                  map_bytes=payload["decay_bytes"])
    exposed, nbytes = exchange_time(method, sp, state, t_intra, hw, layout=layout,
                                    decay_bytes=payload["decay_bytes"], scan_blocks=blocks)
    halo_s, halo_bytes = _conv_halo(sp, payload["halo_bytes"], hw, layout)
    return exposed + halo_s, nbytes + halo_bytes, blocks


def _affine_exchange(mcfg, hw, sp, method, b, t_intra, layout, scan_blocks, kind) -> tuple:
    # dense maps [M | S] (allgather) or states along the chain, nothing overlapped, plus the conv halo
    payload = kind.exchange_payload(mcfg, b, hw.act_bytes)
    H, Dh = mcfg.num_v_heads, mcfg.head_dim   # one state per value head
    state = b * H * Dh * Dh * hw.state_bytes
    blocks = scan_blocks or SCAN_BLOCKS
    if not scan_blocks and sp > 1 and sp_method(method).blocks:   # nothing to hide behind: the output needs S
        blocks = best_scan_blocks(sp, state, 0.0, hw, layout=layout, method=method, map_bytes=state)
    return (*delta_exchange_time(method, sp, b * H, Dh, Dh, hw, layout=layout, halo_bytes=payload["halo_bytes"],
                                 scan_blocks=blocks), blocks)


def _measured_backend(op: str) -> str:
    # the backend `auto` resolves to for `op` inside `lsp.ops.estimate.gpu_code_paths()`
    from lsp.ops.estimate import measured_backend

    return measured_backend(op)


@dataclass(frozen=True)
class OpFamily:
    """What the planner models of the recurrence behind a form of the segment map A (a kind's `state_map`): the
    backend `lsp plan --measure` runs it on, its counted FLOPs per layer (`linear_flops`), the forward FLOPs per
    token and layer its SP path adds, and its exchange (`linear_exchange`)."""
    backend: Callable[[], str]
    counted_flops: Callable[..., float]
    sp_flops: Callable[..., float]
    exchange: Callable[..., tuple]


def _chunk_rule_family(op: str, rule: ChunkRuleFlops) -> OpFamily:
    # a rule on the delta rule's chunk form: a dense map (the delta rule's exchange), the rule's own FLOPs
    return OpFamily(partial(_measured_backend, op), partial(_chunk_rule_counted_flops, rule),
                    lambda mcfg, seq_len: rule.heads(mcfg) * rule.sp_flops(mcfg.head_dim, mcfg.head_dim,
                                                                           min(LINEAR_CHUNK, seq_len)),
                    _affine_exchange)


def _delta_whole_op(mcfg, cls) -> dict:
    from lsp.ops.delta.custom_ops import delta_chunk_flops

    return delta_chunk_flops(mcfg.head_dim, mcfg.head_dim, LINEAR_CHUNK, key=cls.gate_per_key)


def _dplr_whole_op(mcfg, cls) -> dict:
    from lsp.ops.dplr.custom_ops import dplr_chunk_flops

    return dplr_chunk_flops(mcfg.head_dim, mcfg.head_dim, LINEAR_CHUNK)


DELTA_FLOPS = ChunkRuleFlops(heads=lambda mcfg: mcfg.num_v_heads, whole_op=_delta_whole_op,
                             op_flops=delta_flops_per_token, sp_flops=delta_sp_flops_per_token, edge=10, scan_rows=1)
# the DPLR rule (RWKV-7): its chunk form has 2C rows, so the scan op walks two C-row steps per chunk
DPLR_FLOPS = ChunkRuleFlops(heads=lambda mcfg: mcfg.num_heads, whole_op=_dplr_whole_op,
                            op_flops=dplr_flops_per_token, sp_flops=dplr_sp_flops_per_token, edge=20, scan_rows=2)
_DECAYED = OpFamily(partial(_measured_backend, "linear_attention"), _decayed_counted_flops,
                    lambda mcfg, seq_len: 0.0, _decayed_exchange)
OP_FAMILIES = {"identity": _DECAYED, "scalar": _DECAYED, "diagonal": _DECAYED,
               "dense": _chunk_rule_family("delta_rule", DELTA_FLOPS),
               "dplr": _chunk_rule_family("dplr_delta_rule", DPLR_FLOPS)}


def op_family(mcfg, kind: Optional[str] = None) -> OpFamily:
    """The planner's model of a linear kind's recurrence (None: linear_attn); a form of A it does not model
    raises."""
    kind = layer_kind(kind or mcfg.linear_attn)
    key = kind.op_family or kind.state_map
    if key not in OP_FAMILIES:
        raise ValueError(f"linear kind {kind.name!r}: the planner models no segment map of form {key!r} "
                         f"(known: {', '.join(OP_FAMILIES)})")
    return OP_FAMILIES[key]


def _sp_extra_flops(mcfg, sp: int, seq_len: int) -> float:
    # training FLOPs per token the SP path adds to the model's own (3 x forward)
    if sp == 1:
        return 0.0
    return 3 * sum(n * op_family(mcfg, kind).sp_flops(mcfg, seq_len) for kind, n in mcfg.linear_kind_counts().items())


def _micro_step(mcfg, cluster: Cluster, sp: int, method: str, b: int, seq_len: int, ac: bool, layout: str,
                softmax_method: str = DEFAULT_SOFTMAX_METHOD, ep: int = 1):
    """(compute s, exposed SP + EP communication s, backward s, All-Scan blocks) of one micro-step."""
    from .moe import all_to_all_seconds

    hw = cluster.hardware(sp)
    t = b * seq_len / sp
    compute_fwd = (flops_per_token(mcfg, seq_len) + _sp_extra_flops(mcfg, sp, seq_len)) * t / hw.flops / 3
    compute = compute_fwd * (3 + ac)
    H, Hkv, Dh = mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim
    C = min(LINEAR_CHUNK, seq_len)
    t_intra = 2 * 2 * C * Dh * H * t / hw.flops                     # Q Kᵀ and P V inside the chunks of one layer
    # per linear kind of the model; the All-Scan block count reported is the first kind's (one launch key)
    counts = mcfg.linear_kind_counts() or {mcfg.linear_attn: 0}
    exchanges = {kind: linear_exchange(mcfg, hw, sp, method, b, t_intra, layout, kind=kind) for kind in counts}
    blocks = next(iter(exchanges.values()))[2]
    kv = 2 * t * Hkv * Dh * hw.act_bytes
    local_block = 2 * 2 * H * Dh * t * (t / 2) / hw.flops            # causal diagonal block: needs no remote K,V
    attention = 2 * 2 * H * Dh * t * (seq_len / 2) / hw.flops         # the rank's causal pairs, zigzag-balanced
    exposed_S = softmax_exchange_cost(softmax_method, sp, kv, attention, local_block, hw).exposed_s
    comm = 2 * sum(n * exchanges[kind][0] for kind, n in counts.items()) + mcfg.layer_types.count("S") * exposed_S
    comm += all_to_all_seconds(mcfg, int(t), ep, ac, cluster.hardware(ep))
    return compute, comm, compute_fwd * 2, blocks


def sp_sizes(gpus: int, seq_len: int, layout: str) -> List[int]:
    """SP sizes that divide the GPUs and cut the sequence into whole segments (the rule `lsp train` checks)."""
    per_rank = 2 if layout == "zigzag" else 1
    return [sp for sp in range(1, gpus + 1) if gpus % sp == 0 and seq_len % (sp * per_rank) == 0]


def plan_cluster(cfg: Config, cluster: Cluster, *, vocab_size: int, seq_len: Optional[int] = None,
                 global_batch: Optional[int] = None, sp_choices: Optional[List[int]] = None) -> List[Candidate]:
    """Every candidate for `cluster`, best first (fitting ones first, then by tokens/s per GPU)."""
    from .moe import state_bytes
    mcfg = hybrid_config(cfg, vocab_size)
    T = seq_len or cfg.data.seq_len
    p = cfg.parallel
    if global_batch is None:
        config_dp = p.dp or max(1, cluster.gpus // p.sp)
        global_batch = cfg.train.micro_batch * cfg.train.grad_accum * config_dp
    params = model_parameters(mcfg)
    experts = expert_parameters(mcfg)             # split over parallel.ep ranks, reduced apart from DDP (docs/moe.md)
    per_gpu = params - experts + experts / p.ep
    engine = engine_spec(p.engine)
    sizes = sp_choices or sp_sizes(cluster.gpus, T, p.layout)
    micro_batches = [1] if cfg.data.kind != "mqar" else [1, 2, 4, 8, 16, 32, 64]
    # the softmax layers' method matters only with softmax layers; LASP-2H first, so an equal step keeps it
    softmax_methods = registered_softmax_methods() if "S" in mcfg.layer_types else (p.softmax_method,)
    out = []
    for sp in sizes:
        dp = cluster.gpus // sp
        allreduce = 2 * (dp - 1) / dp * per_gpu * 2 / (cluster.dp_gbps * GB) if dp > 1 else 0.0
        # expert parameters stay outside the engine's sharding and buckets (docs/moe.md)
        states = state_bytes(engine, p.zero, cluster.gpus, params - experts, experts / p.ep)
        for b in micro_batches:
            if global_batch % (dp * b):
                continue
            accum = global_batch // (dp * b)
            for ac, softmax in product((False, True), softmax_methods if sp > 1 else softmax_methods[:1]):
                memory = (states + activation_bytes(mcfg, T, b * T // sp, b, ac, p.layout, softmax, p.ep)) / GB \
                    + cluster.reserve_gb
                for method in sp_methods() if sp > 1 else sp_methods()[:1]:
                    compute, comm, backward, blocks = _micro_step(mcfg, cluster, sp, method, b, T, ac, p.layout,
                                                                  softmax, p.ep)
                    step = accum * (compute + comm) + max(0.0, allreduce - backward)
                    out.append(Candidate(sp, dp, method, b, accum, ac, step, accum * compute,
                                         step - accum * compute, memory, global_batch * T / step / cluster.gpus,
                                         memory <= cluster.memory_gb, blocks, softmax))
    out.sort(key=lambda c: (not c.fits, -c.tokens_per_s_per_gpu, c.sp, c.checkpointing))
    return out


def recommend(cfg: Config, cluster: Cluster, rows: Optional[List[Candidate]] = None, **kw) -> Candidate:
    """The fastest candidate that fits (of `rows`, default `plan_cluster(cfg, cluster, **kw)`); ConfigError (one
    line) when none does."""
    rows = plan_cluster(cfg, cluster, **kw) if rows is None else rows
    if not rows:
        raise ConfigError("data.seq_len", f"{kw.get('seq_len') or cfg.data.seq_len} cannot be split into whole "
                          f"{cfg.parallel.layout} segments over any SP size dividing {cluster.gpus} GPUs whose dp "
                          "divides the global batch (train.micro_batch x train.grad_accum x dp)")
    if not rows[0].fits:
        least = min(rows, key=lambda c: c.memory_gb)
        shard = "" if cfg.parallel.zero == 3 else " or ZeRO-3 (parallel.engine=fsdp parallel.zero=3)"
        raise ConfigError("plan", f"no candidate fits in {cluster.memory_gb:g} GB per GPU; the smallest needs "
                          f"{least.memory_gb:.1f} GB ({least.overrides()}): use more GPUs, a shorter "
                          f"data.seq_len{shard}")
    return rows[0]


def format_candidates(rows: List[Candidate], limit: int = 12) -> str:
    head = ("| sp | dp | method | softmax | micro_batch | grad_accum | act. ckpt | step s | exposed comm s | "
            "tokens/s/GPU | GB/GPU | fits |")
    lines = [head, "|" + "---|" * 12]
    for c in rows[:limit]:
        lines.append(f"| {c.sp} | {c.dp} | {c.method} | {c.softmax_method} | {c.micro_batch} | {c.grad_accum} | "
                     f"{'yes' if c.checkpointing else 'no'} | {c.step_s:.4g} | {c.comm_s:.3g} | "
                     f"{c.tokens_per_s_per_gpu:.4g} | {c.memory_gb:.1f} | {'yes' if c.fits else 'no'} |")
    return "\n".join(lines)
