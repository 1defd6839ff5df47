"""Parameter and FLOP counts for MFU.

flops_per_token(cfg, T) = 6 · N_matmul + Σ_softmax layers 6 · H · Dh · T + Σ_linear layers (the kind's recurrence)

* 6 · N_matmul: forward 2 and backward 4 FLOPs per weight of every matmul a token goes through (all projections,
  the MLP, the LM head; the embedding lookup and norms are free).
* Softmax attention (causal, average context T / 2): forward QKᵀ and AV cost 2 · 2 · Dh · T/2 per head, times 3
  for forward + backward: 6 · H · Dh · T (the causal half of PaLM's 12 · H · Dh · T).
* A linear layer: its kind's `attention_flops_per_token` (by default the chunked path, 6 · H · (C (K + V) + 2 K V)
  with chunk C = min(64, T), K = V = Dh: see `LinearKind`); its weights are the kind's `matmul_weights`.
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


def matmul_parameters(cfg: HybridConfig) -> int:
    """Weights of every matmul one token passes through (LM head included, counted once even when tied)."""
    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    mlp = 3 * D * cfg.intermediate_size
    softmax = 2 * D * H * Dh + 2 * D * Hkv * Dh
    linear = layer_kind(cfg.linear_attn).matmul_weights(cfg)
    types = cfg.layer_types
    return types.count("S") * (softmax + mlp) + types.count("L") * (linear + mlp) + cfg.vocab_size * D


def flops_per_token(cfg: HybridConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length seq_len; see the module docstring."""
    softmax_attn = 6 * cfg.num_heads * cfg.head_dim * seq_len
    linear_attn = layer_kind(cfg.linear_attn).attention_flops_per_token(cfg, seq_len)
    types = cfg.layer_types
    return 6 * matmul_parameters(cfg) + types.count("S") * softmax_attn + types.count("L") * linear_attn
