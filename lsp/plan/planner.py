"""`lsp plan`: choose SP size, SP method, micro-batch and activation checkpointing for a config on a cluster.

The planner enumerates every candidate (sp, method, micro_batch, activation checkpointing) for N GPUs, keeps the
global batch of the config fixed (micro_batch · grad_accum · dp sequences; dp = N / sp, so grad_accum adapts),
models the step time and the memory per GPU of each, and recommends the fastest candidate that fits in memory.
It is a model (no GPU is touched): treat absolute numbers as an order of magnitude, the ranking as the result.

Step time of one optimizer step, per GPU (T = seq_len, b = micro_batch, t = b · T / sp local tokens):

    micro   = compute + Σ_L layers exchange_L + Σ_S layers exchange_S
    compute = (1 + ac/3) · flops_per_token(cfg, T) · t / F         (activation checkpointing re-runs the forward)
    exchange_L (per pass, forward and backward): lsp.plan.costmodel.exchange_time(method, sp, b·H·K·V·4 bytes,
              t_intra, layout, decay b·H·K_g·4 bytes, scan_blocks) - what the ring / allgather / allscan exchanges
              send and overlap for the config's layout, with All-Scan's block count chosen by the model; delta-rule
              layers (deltanet, gated_deltanet): costmodel.delta_exchange_time (the K·(K+V) maps for allgather,
              nothing overlapped, plus the short-conv halo) and, for sp > 1, delta_sp_flops_per_token more compute
    exchange_S (LASP-2H): all-gather of K,V forward, the reduce of their gradients backward, each
              (sp-1)·(α + kv/β) with kv = 2·t·Hkv·Dh·2 bytes, overlapped with the rank's local diagonal block
    step    = grad_accum · micro + max(0, allreduce_dp - backward of one micro-step)
              (ring all-reduce of the bf16 gradients over dp, 2·(dp-1)/dp · P · 2 bytes, overlapped with backward)

β is NVLink inside a node (the SP group is placed on consecutive ranks, so sp <= gpus_per_node stays inside one)
and the network across nodes. Memory per GPU:

    states      16 bytes/parameter (fp32 weight, gradient, AdamW m and v), sharded by the engine over all
                n = dp·sp ranks: the engine class's `state_bytes_per_param` (lsp/engines.py, which tabulates them)
    activations what autograd keeps on rank 0, counted tensor by tensor (saved-tensor hooks on fake tensors, bf16
                autocast, the chunked torch path of the linear layers) and written out in `saved_bytes`, per layer
                (D hidden, F SwiGLU width, H heads of Dh, Hkv key heads, C chunk, r GLA's gate rank):
                  both kinds: 20·D + 8·F + 8 per token (two RMSNorms, SwiGLU in bf16)
                  softmax:    6·D + 6·H·Dh + 4·Hkv·Dh + 16·Dh + 4·H per token (projection inputs, q, k, v,
                              o, RoPE tables, log-sum-exp), under SP + the gathered bf16 K|V, 4·Hkv·Dh per
                              global token
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
from typing import List, Optional

from lsp.engines import engine_spec
from lsp.models.flops import LINEAR_CHUNK, flops_per_token, matmul_parameters
from lsp.names import DELTA_VARIANTS, SCAN_BLOCKS, SP_METHODS
from lsp.train.config import Config, ConfigError, hybrid_config

from .costmodel import (
    Hardware,
    best_delta_scan_blocks,
    best_scan_blocks,
    delta_exchange_time,
    delta_flops_per_token,
    delta_sp_flops_per_token,
    exchange_time,
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
    scan_blocks: int = SCAN_BLOCKS   # All-Scan pipeline blocks (the model's best, for method allscan)

    def overrides(self) -> str:
        blocks = f" parallel.scan_blocks={self.scan_blocks}" if self.method == "allscan" else ""
        return (f"parallel.sp={self.sp} parallel.dp={self.dp} parallel.sp_method={self.method}{blocks} "
                f"train.micro_batch={self.micro_batch} train.grad_accum={self.grad_accum} "
                f"train.activation_checkpointing={str(self.checkpointing).lower()}")


def model_parameters(mcfg) -> int:
    """Every parameter of HybridLM: the matmul weights, the embedding (untied), RMSNorm weights (two per block,
    the final one, the linear layers' per-head output norm), the biases of the decay projections and the delta
    layers' short convolution, beta bias and (gated) A_log, dt_bias."""
    D, H, Dh, types = mcfg.hidden_size, mcfg.num_heads, mcfg.head_dim, mcfg.layer_types
    conv = 3 * H * Dh * mcfg.delta_conv_size                       # delta layers' short conv (q, k, v channels)
    bias = {"linear": 0, "lightning": 0, "simple_gla": H, "gla": H * Dh, "deltanet": H + conv,
            "gated_deltanet": 3 * H + conv}[mcfg.linear_attn]      # + beta bias; gated: A_log, dt_bias
    small = 2 * D * len(types) + D + types.count("L") * (Dh + bias)
    return matmul_parameters(mcfg) + (0 if mcfg.tie_embeddings else mcfg.vocab_size * D) + small


def _layer_weights(mcfg) -> dict:
    # weights of one layer's matmuls by kind: bf16 autocast keeps a copy of each for backward
    D, F, H, Hkv, Dh = (mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_heads, mcfg.num_kv_heads,
                        mcfg.head_dim)
    decay = {"linear": 0, "lightning": 0, "simple_gla": D * H, "gla": (D + H * Dh) * mcfg.gate_low_rank_dim,
             "deltanet": D * H, "gated_deltanet": 2 * D * H}[mcfg.linear_attn]   # delta: beta (+ decay)
    return {"S": 2 * D * H * Dh + 2 * D * Hkv * Dh + 3 * D * F, "L": 5 * D * H * Dh + decay + 3 * D * F}


def saved_bytes(mcfg, kind: str, backend: str = "torch") -> dict:
    """Bytes autograd keeps for one layer of `kind` ("L" or "S") under bf16 autocast, split by what they scale
    with; counted tensor by tensor with saved-tensor hooks on fake tensors (module docstring) and written out:

        token   per local token    norms, bf16 input copies of every projection, SwiGLU, the layer's own tensors
        padded  per padded token   the chunked linear-attention core (each segment padded to whole chunks)
        segment per held segment   (and batch row) of an SP rank: the entering states kept for backward
        keys    per global token   softmax under SP: the all-gathered bf16 K|V buffer
    backend: the linear-attention path of GLA-family layers, "torch" (chunked) or "triton" (the custom ops);
    delta-rule layers always run the chunked torch path. D hidden, F SwiGLU width, H heads of Dh, Hkv key heads,
    C chunk, r GLA's gate rank; K = V = Dh."""
    D, F, H, Hkv, Dh = (mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_heads, mcfg.num_kv_heads,
                        mcfg.head_dim)
    C, r = LINEAR_CHUNK, mcfg.gate_low_rank_dim
    mlp_and_norms = 20 * D + 8 * F + 8           # two RMSNorms (input, statistics, output), SwiGLU in bf16
    if kind == "S":                               # q/k/v input copies, RoPE tables, q, k, v, o, o_proj input, lse
        return {"token": mlp_and_norms + 6 * D + 6 * H * Dh + 4 * Hkv * Dh + 16 * Dh + 4 * H, "padded": 0,
                "segment": 0, "keys": 4 * Hkv * Dh}
    if mcfg.linear_attn in DELTA_VARIANTS:            # conv input/halo rows, silu, L2 norms, beta, decay, gated norm
        return {"token": mlp_and_norms + 8 * D + 66 * H * Dh + 30 * H + 6, "keys": 0,
                # UT transform, chunk scan of the augmented state [M | S] (K x (K + V) per chunk), outputs
                "padded": 52 * H * Dh + 28 * H * C + 16 * H + 4 * H / C + 24 * H * Dh * Dh / C,
                "segment": 16 * H * Dh * Dh}         # [M | S] maps and entering states of the held segments
    own = mlp_and_norms + 10 * D + 24 * H * Dh + 4 * H + 2 * r            # GLA: decay logits in fp32
    if backend == "triton":     # the op keeps q, k, v (bf16) and the fp32 decay; h is recomputed in backward
        decay = {"gla": 4 * H * Dh, "simple_gla": 4 * H}.get(mcfg.linear_attn, 0)
        return {"token": own + 6 * H * Dh + decay, "padded": 0, "segment": 4 * H * Dh * Dh, "keys": 0}
    return {"token": own, "keys": 0,
            "padded": 50 * H * Dh + 4 * H * C + 4 * H * Dh / C + 8 * H * Dh * Dh / C,   # padded fp32 chunks
            "segment": 4 * H * Dh * Dh, "incoming": 6 * H * Dh}  # + q and o0 of add_incoming_state (SP)


def linear_backend(mcfg) -> str:
    """The path `lsp plan --measure` runs the linear layers on: the GPU's (`lsp.ops.estimate`), Triton for the
    GLA family once its custom ops are registered; the delta rule has no Triton kernel yet (chunked torch)."""
    from lsp.ops.estimate import measured_linear_backend

    return "torch" if mcfg.linear_attn in DELTA_VARIANTS else measured_linear_backend()


def local_segments(seq_len: int, local_tokens: int, micro_batch: int, layout: str) -> tuple[int, int]:
    """(held segments, tokens of each) of rank 0: zigzag holds 2 under SP, contiguous and no SP one."""
    sp = max(1, micro_batch * seq_len // local_tokens)
    held = 2 if layout == "zigzag" and sp > 1 else 1
    return held, local_tokens // micro_batch // held


def layer_activation_bytes(mcfg, kind: str, seq_len: int, local_tokens: int, micro_batch: int,
                           layout: str = "zigzag") -> float:
    """Bytes one layer of `kind` keeps for backward on rank 0: `saved_bytes` at the launch's token counts, plus
    a bf16 copy of each of its weights (autocast)."""
    sp = max(1, micro_batch * seq_len // local_tokens)
    held, Ts = local_segments(seq_len, local_tokens, micro_batch, layout)
    padded = micro_batch * held * -(-Ts // LINEAR_CHUNK) * LINEAR_CHUNK
    b = saved_bytes(mcfg, kind, linear_backend(mcfg))
    sharded = sp > 1
    incoming = b.get("incoming", 0) if sharded and layout == "zigzag" else 0
    return ((b["token"] + incoming) * local_tokens + b["padded"] * padded
            + sharded * (b["segment"] * micro_batch * held + b["keys"] * micro_batch * seq_len)
            + 2 * _layer_weights(mcfg)[kind])


def activation_bytes(mcfg, seq_len: int, local_tokens: int, micro_batch: int, checkpointing: bool,
                     layout: str = "zigzag") -> float:
    """Bytes of activations kept for backward on rank 0 (module docstring)."""
    D, V = mcfg.hidden_size, mcfg.vocab_size
    layer = {t: layer_activation_bytes(mcfg, t, seq_len, local_tokens, micro_batch, layout) for t in "LS"}
    # embedding ids, final norm, the fused cross-entropy's fp32 input gradient and weight gradient
    head = (12 * D + 12) * local_tokens + 4 * V * D
    types = mcfg.layer_types
    if not checkpointing:
        return head + sum(layer[t] for t in types)
    return head + 4 * D * local_tokens * len(types) + max(layer[t] for t in set(types))


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
    weights = _layer_weights(mcfg)
    blocks = sum(weights[t] for t in types)
    recomputed = blocks - len(types) * D * mcfg.intermediate_size   # the recompute stops before down_proj
    matmul = (6 * blocks + 2 * ac * recomputed + 6 * mcfg.vocab_size * D) * local_tokens
    linear = types.count("L") * linear_flops(mcfg, seq_len, local_tokens, micro_batch, ac, layout)
    _, seg = local_segments(seq_len, local_tokens, micro_batch, layout)
    rows = {1: seq_len * seq_len}.get(sp, seg * seg * (2 * sp + 1 if layout == "zigzag" else 1))
    softmax = types.count("S") * (14 + 4 * ac) * H * Dh * micro_batch * rows
    return matmul + linear + softmax


def linear_flops(mcfg, seq_len: int, local_tokens: int, micro_batch: int, ac: int, layout: str) -> float:
    """FLOPs FlopCounterMode counts for one linear layer's attention (forward, backward, checkpoint recompute).
    Torch path: `linear_core_flops`, forward one third. Triton path: the custom ops' formulas
    (`lsp.ops.linear.custom_ops.chunk_flops`: S states, O output per pass; backward 2x plus a recomputed states
    scan per piece, two pieces under SP, the whole op without) and, under SP, the incoming-state correction's
    einsums on the segments that receive a state (2·K·V per token forward, twice that backward)."""
    H, Dh = mcfg.num_heads, mcfg.head_dim
    sp = max(1, micro_batch * seq_len // local_tokens)
    held, seg = local_segments(seq_len, local_tokens, micro_batch, layout)
    if mcfg.linear_attn in DELTA_VARIANTS:   # the chunked torch path (no delta custom ops yet)
        return H * _delta_counted_per_token(Dh, seg, sp, ac) * local_tokens
    if linear_backend(mcfg) == "torch":
        chunks = micro_batch * held * -(-seg // LINEAR_CHUNK)
        return H * linear_core_flops(mcfg, chunks, micro_batch * held) * (1 + ac / 3)
    from lsp.ops.linear.custom_ops import chunk_flops

    c = chunk_flops(micro_batch * held, seg, H, Dh, Dh)
    S, O = c["states"], c["output"]
    entering = micro_batch * seg * (held - 1 if layout == "zigzag" else 0) if sp > 1 else 0
    return (3 + ac) * (S + O) + (2 if sp > 1 else 1) * S + (3 + ac) * 2 * H * Dh * Dh * entering


def linear_core_flops(mcfg, chunks: int, segments: int) -> float:
    """FlopCounterMode's count of one head of a linear-attention layer's chunk core (forward + backward) over
    `chunks` padded chunks of C = 64 tokens in `segments` segments, counted on the chunked torch path at head dims
    32, 64, 128 and one or two chunks per segment and written out (K = V = Dh); the first chunk of a segment
    enters a zero state, hence the per-segment correction (GLA family; the delta rule: `_delta_counted_per_token`):
        chunks · C·(528·Dh + 19.25·Dh²) - segments · 8.5·C·Dh²"""
    C, Dh = LINEAR_CHUNK, mcfg.head_dim
    return chunks * C * (528 * Dh + 19.25 * Dh * Dh) - segments * 8.5 * C * Dh * Dh


def _delta_counted_per_token(Dh: int, seg: int, sp: int, ac: int) -> float:
    # counted FLOPs per token and head of a delta layer (costmodel.delta_flops_per_token, exact on the op;
    # checkpointing re-runs the forward; SP adds the augmented scan), for segments of seg tokens in whole chunks
    C = LINEAR_CHUNK
    chunks = -(-seg // C)
    fwd, bwd = delta_flops_per_token(C, Dh, Dh, chunks)
    if sp > 1:
        extra = delta_sp_flops_per_token(Dh, Dh, C)
        fwd, bwd = fwd + extra, bwd + 10 * Dh * Dh / chunks + 2 * extra
    return (fwd * (1 + ac) + bwd) * chunks * C / seg


def _decay_dims(mcfg) -> int:
    # K_g of the linear layers' decay: per key (GLA), one per head (Lightning, simple GLA), none (linear)
    return {"linear": 0, "gla": mcfg.head_dim}.get(mcfg.linear_attn, 1)


def linear_exchange(mcfg, hw: Hardware, sp: int, method: str, b: int, t_intra: float, layout: str,
                    scan_blocks: Optional[int] = None) -> tuple:
    """(exposed s, bytes received per GPU, All-Scan blocks) of one linear layer's SP exchange in one pass, for the
    config's linear kind (delta-rule layers: their maps and conv halo); scan_blocks None: the model's best."""
    H, Dh = mcfg.num_heads, mcfg.head_dim
    state = b * H * Dh * Dh * hw.state_bytes
    if mcfg.linear_attn in DELTA_VARIANTS:
        blocks = scan_blocks or (best_delta_scan_blocks(sp, state, hw, layout=layout) if sp > 1 else SCAN_BLOCKS)
        halo = b * (mcfg.delta_conv_size - 1) * 3 * H * Dh * hw.act_bytes
        return (*delta_exchange_time(method, sp, b * H, Dh, Dh, hw, layout=layout, halo_bytes=halo,
                                     scan_blocks=blocks), blocks)
    blocks = scan_blocks or (best_scan_blocks(sp, state, t_intra, hw, layout=layout) if sp > 1 else SCAN_BLOCKS)
    return (*exchange_time(method, sp, state, t_intra, hw, layout=layout, decay_bytes=b * H * _decay_dims(mcfg) * 4,
                           scan_blocks=blocks), blocks)


def _sp_extra_flops(mcfg, sp: int, seq_len: int) -> float:
    # training FLOPs per token the SP path adds to the model's own (delta layers: the augmented scan, 3 x forward)
    if sp == 1 or mcfg.linear_attn not in DELTA_VARIANTS:
        return 0.0
    per_head = delta_sp_flops_per_token(mcfg.head_dim, mcfg.head_dim, min(LINEAR_CHUNK, seq_len))
    return 3 * mcfg.layer_types.count("L") * mcfg.num_heads * per_head


def _micro_step(mcfg, cluster: Cluster, sp: int, method: str, b: int, seq_len: int, ac: bool, layout: str):
    """(compute s, exposed SP communication s, backward s, All-Scan blocks) of one micro-step."""
    hw = cluster.hardware(sp)
    t = b * seq_len / sp
    compute_fwd = (flops_per_token(mcfg, seq_len) + _sp_extra_flops(mcfg, sp, seq_len)) * t / hw.flops / 3
    compute = compute_fwd * (3 + ac)
    H, Hkv, Dh = mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim
    C = min(LINEAR_CHUNK, seq_len)
    t_intra = 2 * 2 * C * Dh * H * t / hw.flops                     # Q Kᵀ and P V inside the chunks of one layer
    exposed_L, _, blocks = linear_exchange(mcfg, hw, sp, method, b, t_intra, layout)
    kv = 2 * t * Hkv * Dh * hw.act_bytes
    local_block = 2 * 2 * H * Dh * t * (t / 2) / hw.flops            # causal diagonal block: needs no remote K,V
    exposed_S = max(0.0, (sp - 1) * (hw.latency + kv / hw.bandwidth) - local_block) if sp > 1 else 0.0
    types = mcfg.layer_types
    comm = 2 * (types.count("L") * exposed_L + types.count("S") * exposed_S)
    return compute, comm, compute_fwd * 2, blocks


def sp_sizes(gpus: int, seq_len: int, layout: str) -> List[int]:
    """SP sizes that divide the GPUs and cut the sequence into whole segments (the rule `lsp train` checks)."""
    per_rank = 2 if layout == "zigzag" else 1
    return [sp for sp in range(1, gpus + 1) if gpus % sp == 0 and seq_len % (sp * per_rank) == 0]


def plan_cluster(cfg: Config, cluster: Cluster, *, vocab_size: int, seq_len: Optional[int] = None,
                 global_batch: Optional[int] = None, sp_choices: Optional[List[int]] = None) -> List[Candidate]:
    """Every candidate for `cluster`, best first (fitting ones first, then by tokens/s per GPU)."""
    mcfg = hybrid_config(cfg, vocab_size)
    T = seq_len or cfg.data.seq_len
    p = cfg.parallel
    if global_batch is None:
        config_dp = p.dp or max(1, cluster.gpus // p.sp)
        global_batch = cfg.train.micro_batch * cfg.train.grad_accum * config_dp
    params = model_parameters(mcfg)
    sizes = sp_choices or sp_sizes(cluster.gpus, T, p.layout)
    micro_batches = [1] if cfg.data.kind != "mqar" else [1, 2, 4, 8, 16, 32, 64]
    out = []
    for sp in sizes:
        dp = cluster.gpus // sp
        allreduce = 2 * (dp - 1) / dp * params * 2 / (cluster.dp_gbps * GB) if dp > 1 else 0.0
        states = engine_spec(p.engine).state_bytes_per_param(p.zero, cluster.gpus) * params
        for b in micro_batches:
            if global_batch % (dp * b):
                continue
            accum = global_batch // (dp * b)
            for ac in (False, True):
                memory = (states + activation_bytes(mcfg, T, b * T // sp, b, ac, p.layout)) / GB + cluster.reserve_gb
                for method in SP_METHODS if sp > 1 else SP_METHODS[:1]:
                    compute, comm, backward, blocks = _micro_step(mcfg, cluster, sp, method, b, T, ac, p.layout)
                    step = accum * (compute + comm) + max(0.0, allreduce - backward)
                    out.append(Candidate(sp, dp, method, b, accum, ac, step, accum * compute,
                                         step - accum * compute, memory, global_batch * T / step / cluster.gpus,
                                         memory <= cluster.memory_gb, blocks))
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
    head = ("| sp | dp | method | micro_batch | grad_accum | act. ckpt | step s | exposed comm s | tokens/s/GPU | "
            "GB/GPU | fits |")
    lines = [head, "|" + "---|" * 11]
    for c in rows[:limit]:
        lines.append(f"| {c.sp} | {c.dp} | {c.method} | {c.micro_batch} | {c.grad_accum} | "
                     f"{'yes' if c.checkpointing else 'no'} | {c.step_s:.4g} | {c.comm_s:.3g} | "
                     f"{c.tokens_per_s_per_gpu:.4g} | {c.memory_gb:.1f} | {'yes' if c.fits else 'no'} |")
    return "\n".join(lines)
