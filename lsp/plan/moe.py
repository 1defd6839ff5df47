"""The MoE figures of a config for `lsp plan`: total vs active parameters, expert memory per rank, all-to-all bytes,
active FLOPs (docs/moe.md). A model, like the planner: uniform routing is assumed for the all-to-all.

Per GPU with expert parallelism ep (experts split over ep ranks, everything else replicated over dp × sp):

    expert params    P_e = Σ_MoE layers E · 3 · D · I_moe             (routed experts only; router and shared are dense)
    params per GPU   P - P_e + P_e / ep
    states per GPU   16 B · (P - P_e + P_e / ep) + 4 B · (P - P_e)    (fp32 weight, grad, AdamW m, v; DDP buckets
                                                                      for the dense part, experts are reduced apart)
    all-to-all       per MoE layer and micro-step: t·k·(ep-1)/ep rows leave the rank (t = micro_batch · T / sp
                     local tokens, uniform routing), D values of act_bytes each, sent to the experts and back
                     (dispatch + combine), forward and backward: 4 · t·k·(ep-1)/ep · D · act_bytes, and once more
                     forward with activation checkpointing (the recompute dispatches again)
    all-to-all time  the bytes rank 0 receives (`all_to_all_bytes`, exact for uniform routing) over the EP group's
                     bandwidth, exposed (nothing overlaps it), in the planner's step time
    active FLOPs     flops_per_token: 6 · (weights a token passes through: router, top-k and shared experts)
"""
from __future__ import annotations

from dataclasses import dataclass

from lsp.models.flops import expert_parameters, flops_per_token, matmul_parameters

from .planner import model_parameters

GB = 1e9


@dataclass
class MoEFigures:
    total_params: int
    active_params: int
    expert_params: int
    params_per_gpu: float
    states_gb_per_gpu: float
    all_to_all_gb_per_step: float      # sent by one GPU per optimizer step, all MoE layers
    active_flops_per_token: float


def moe_figures(mcfg, *, ep: int, sp: int, micro_batch: int, grad_accum: int, seq_len: int,
                checkpointing: bool = False, act_bytes: int = 2) -> MoEFigures:
    """The figures of the module docstring for one GPU of a dp × sp mesh with EP groups of ep ranks."""
    total = model_parameters(mcfg)
    active = total - (matmul_parameters(mcfg, active=False) - matmul_parameters(mcfg))
    experts = expert_parameters(mcfg)
    per_gpu = total - experts + experts / ep
    layers = sum(mcfg.is_moe_layer(i) for i in range(mcfg.num_layers))
    t = micro_batch * seq_len / sp
    passes = 4 + (2 if checkpointing else 0)
    a2a = layers * passes * t * mcfg.moe_top_k * (ep - 1) / ep * mcfg.hidden_size * act_bytes * grad_accum
    return MoEFigures(total, active, experts, per_gpu, (16 * per_gpu + 4 * (total - experts)) / GB, a2a / GB,
                      flops_per_token(mcfg, seq_len))


def format_moe(f: MoEFigures, ep: int) -> str:
    return "\n".join([
        f"| MoE (ep={ep}) | total params | active params | expert params | params/GPU | states GB/GPU | "
        "all-to-all GB/step/GPU | active TFLOP/token |",
        "|---|---|---|---|---|---|---|---|",
        f"| | {f.total_params / 1e9:.3f}B | {f.active_params / 1e9:.3f}B | {f.expert_params / 1e9:.3f}B | "
        f"{f.params_per_gpu / 1e9:.3f}B | {f.states_gb_per_gpu:.1f} | {f.all_to_all_gb_per_step:.2f} | "
        f"{f.active_flops_per_token / 1e12:.4f} |"])





# ------------------------------------------------------------------ `lsp plan --measure`'s model of an MoE block
# Rank 0 of a step: t local tokens per micro-step, experts split over ep ranks, routing taken as uniform (what the
# fake-tensor step runs: lsp.ops.moe.uniform_counts). Each term replaces the dense SwiGLU of intermediate_size F
# that the planner's per-kind layer terms hold.

def moe_layer_count(mcfg) -> int:
    return sum(mcfg.is_moe_layer(i) for i in range(mcfg.num_layers))


def moe_saved_per_token(mcfg) -> float:
    """Bytes one MoE block keeps for backward per local token under bf16 autocast, beyond a dense SwiGLU's 8F + 4D:
    per chosen expert the bf16 dispatched row (2D), its fp32 weighted output (4D), the gate / up / silu / product
    rows (8I), the row's indices and weight (40 B) plus 4D of fp32 copies; the fp32 router input and scores
    (4D + 4E + 4); the shared experts as a SwiGLU of width S·I (8SI + 4D); with an aux or z loss the fp32 logits
    and their normaliser (4E + 8). Counted with saved-tensor hooks on a
    real CPU step of the module (tests/plan/test_moe_plan.py::test_moe_saved_bytes_per_token)."""
    D, E, k, I, S = (mcfg.hidden_size, mcfg.moe_experts, mcfg.moe_top_k, mcfg.moe_intermediate_size,
                     mcfg.moe_shared_experts)
    moe = k * (10 * D + 8 * I + 40) + 4 * D + 4 * E + 4 + (8 * S * I + 4 * D if S else 0)
    if mcfg.moe_aux_loss_coef or mcfg.moe_z_loss_coef:
        moe += 4 * E + 8
    return moe - (8 * mcfg.intermediate_size + 4 * D)


def moe_weight_copies(mcfg, ep: int) -> float:
    """bf16 autocast copies of the block's local experts and shared experts, beyond the dense SwiGLU's 3DF."""
    D, I = mcfg.hidden_size, mcfg.moe_intermediate_size
    return 2 * 3 * D * (I * (mcfg.moe_experts // ep + mcfg.moe_shared_experts) - mcfg.intermediate_size)


def moe_flops_per_token(mcfg, checkpointing: bool) -> float:
    """Counted FLOPs per local token of one MoE block beyond the dense SwiGLU's: router D·E and k + S experts of
    3DI, 6 per weight (forward + backward; under uniform routing rank 0's experts see as many rows as it sends);
    the recompute of a checkpointed block runs all but the shared experts' down projection (the last op whose
    output backward does not keep)."""
    D, E, k, I, S, F = (mcfg.hidden_size, mcfg.moe_experts, mcfg.moe_top_k, mcfg.moe_intermediate_size,
                        mcfg.moe_shared_experts, mcfg.intermediate_size)
    weights = D * E + 3 * D * I * (k + S)
    recomputed = weights - D * I * S if S else weights
    return 6 * (weights - 3 * D * F) + 2 * checkpointing * (recomputed - 2 * D * F)


def all_to_all_bytes(mcfg, local_tokens: int, ep: int, checkpointing: bool, act_bytes: int) -> float:
    """Bytes rank 0 receives per micro-step in the EP all-to-alls of every MoE block, exactly as the fake step
    runs them: the counts (E / ep int64 from each other rank) and, with B0 the rows bound for rank 0's own experts
    (uniform counts of its t·k assignments, capacity applied), (ep - 1)·B0 dispatched rows plus t·k - B0 returned
    rows of D values; backward the same again; a checkpointed block's recompute repeats the forward."""
    from lsp.ops.moe import capacity, uniform_counts

    if ep == 1:
        return 0.0
    E, k, D = mcfg.moe_experts, mcfg.moe_top_k, mcfg.hidden_size
    n = E // ep
    counts = uniform_counts(local_tokens * k, E)
    slots = capacity(local_tokens, k, E, mcfg.moe_capacity_factor)
    kept = counts if slots is None else counts.clamp(max=slots)
    own, total = int(kept[:n].sum()), int(kept.sum())
    rows = ((ep - 1) * own + total - own) * D * act_bytes
    forwards = 1 + int(checkpointing)
    return moe_layer_count(mcfg) * (forwards * (rows + (ep - 1) * n * 8) + rows)


def all_to_all_seconds(mcfg, local_tokens: int, ep: int, checkpointing: bool, hw) -> float:
    """Time of a micro-step's EP all-to-alls, exposed: the experts wait for the dispatch and the block's output
    for the combine, so nothing hides them. Received bytes over the per-GPU bandwidth of the EP group (hw: its
    `Hardware`, NVLink inside a node), plus one latency per message (ep - 1 per all-to-all, 3 all-to-alls per
    block forward, 2 backward)."""
    if ep == 1 or not mcfg.moe_experts:
        return 0.0
    messages = moe_layer_count(mcfg) * (ep - 1) * (3 * (1 + int(checkpointing)) + 2)
    return all_to_all_bytes(mcfg, local_tokens, ep, checkpointing, hw.act_bytes) / hw.bandwidth \
        + messages * hw.latency


def state_bytes(engine, zero: int, gpus: int, dense: float, experts_local: float) -> float:
    """Weight + gradient + AdamW bytes per GPU: the dense parameters as the engine keeps them (its sharding and
    buckets), the rank's experts whole at 16 B each (every engine leaves them to lsp.train.expert_parallel)."""
    return engine.state_bytes_per_param(zero, gpus) * dense + 16 * experts_local


def expert_reduction_bytes(expert_param_bytes: float, world: int, ep: int) -> float:
    """Bytes rank 0 receives all-reducing its expert gradients over their world / ep replicas (ring all-reduce)."""
    replicas = world // ep
    return 2 * (replicas - 1) / replicas * expert_param_bytes if replicas > 1 else 0.0


__all__ = ["MoEFigures", "moe_figures", "format_moe", "moe_saved_per_token", "moe_weight_copies",
           "moe_flops_per_token", "all_to_all_bytes", "all_to_all_seconds", "state_bytes",
           "expert_reduction_bytes"]
