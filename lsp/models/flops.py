"""Parameter and FLOP counts for MFU.

flops_per_token(cfg, T) = 6 · N_matmul + Σ_softmax layers 6 · H · Dh · T + Σ_linear layers (the kind's recurrence)

* 6 · N_matmul: forward 2 and backward 4 FLOPs per weight of every matmul a token goes through (all projections,
  the MLP, the LM head; the embedding lookup and norms are free).
* Softmax attention (causal, average context T / 2): forward QKᵀ and AV cost 2 · 2 · Dh · T/2 per head, times 3
  for forward + backward: 6 · H · Dh · T (the causal half of PaLM's 12 · H · Dh · T).
* A linear layer: its kind's `attention_flops_per_token` (by default the chunked path, 6 · H · (C (K + V) + 2 K V)
  with chunk C = min(64, T), K = V = Dh: see `LinearKind`); its weights are the kind's `matmul_weights`.
* Mixture of experts (docs/moe.md): a token passes through the router (D·E), its top-k routed experts and the
  shared experts (3·D·I_moe each), so N_matmul counts the active weights; `total_matmul_parameters` counts every
  expert (memory, checkpoints).
"""
from __future__ import annotations

import torch.nn as nn

from .config import HybridConfig
from .linear_kind import layer_kind


def num_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of distinct parameters; exclude_embeddings drops the token-embedding table (which, with tied
    embeddings, is also the LM head)."""
    seen, total = set(), 0
    skip = {id(model.embed.weight)} if exclude_embeddings and hasattr(model, "embed") else set()
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def matmul_parameters(cfg: HybridConfig, active: bool = True) -> int:
    """Weights of every matmul one token passes through (LM head included, counted once even when tied); with
    active=False every MoE expert is counted, not only the top-k a token uses (the model's total)."""
    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    softmax = 2 * D * H * Dh + 2 * D * Hkv * Dh
    linear = linear_layer_parameters(cfg)[0]
    mlps = sum(mlp_parameters(cfg, i, active) for i in range(cfg.num_layers))
    return cfg.layer_types.count("S") * softmax + linear + mlps + cfg.vocab_size * D


def linear_layer_parameters(cfg: HybridConfig) -> tuple[int, int]:
    """(matmul weights, other parameters) of every linear layer of the model: per kind, its count times its
    formulas plus what its first layer has beyond the others (`LinearKind.first_layer_difference`)."""
    matmul = other = 0
    for kind, n in cfg.linear_kind_counts().items():
        cls = layer_kind(kind)
        first_matmul, first_other = cls.first_layer_difference(cfg)
        matmul += n * cls.matmul_weights(cfg) + first_matmul
        other += n * cls.other_parameters(cfg) + first_other
    return matmul, other


def mlp_parameters(cfg: HybridConfig, layer_idx: int, active: bool = True) -> int:
    """Feed-forward weights of block layer_idx: SwiGLU 3·D·I, or an MoE's router D·E + (k or E routed + shared)
    experts of 3·D·I_moe."""
    D = cfg.hidden_size
    if not cfg.is_moe_layer(layer_idx):
        return 3 * D * cfg.intermediate_size
    routed = cfg.moe_top_k if active else cfg.moe_experts
    return D * cfg.moe_experts + (routed + cfg.moe_shared_experts) * 3 * D * cfg.moe_intermediate_size


def expert_parameters(cfg: HybridConfig) -> int:
    """Weights of the routed experts (what expert parallelism splits over ep ranks): Σ_MoE blocks E · 3 · D · I_moe."""
    layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    return layers * cfg.moe_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size


def total_matmul_parameters(cfg: HybridConfig) -> int:
    """`matmul_parameters` with every expert counted (what memory and checkpoints hold)."""
    return matmul_parameters(cfg, active=False)


def flops_per_token(cfg: HybridConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length seq_len; see the module docstring."""
    softmax_attn = 6 * cfg.num_heads * cfg.head_dim * seq_len
    linear_attn = sum(n * layer_kind(kind).attention_flops_per_token(cfg, seq_len)
                      for kind, n in cfg.linear_kind_counts().items())
    return 6 * matmul_parameters(cfg) + cfg.layer_types.count("S") * softmax_attn + linear_attn
