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


__all__ = ["MoEFigures", "moe_figures", "format_moe"]
