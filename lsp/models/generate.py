"""Autoregressive generation from `HybridLM` with recurrent decoding.

The prompt is consumed once (prefill: the chunked / Triton linear-attention op with `output_final_state`, SDPA for
softmax layers), leaving every layer's cache (`cache.py`): the d_k x d_v state per head of a linear layer, the keys
and values of a softmax layer. Each new token then costs one recurrence step per linear layer, O(1) in the length
so far, and one query against the KV cache per softmax layer.

Sampling from the last position's logits z (fp32):
    temperature == 0   greedy, argmax z
    otherwise          p = softmax(z / temperature) restricted to the top_k largest logits and to the smallest set
                       of tokens whose probability mass reaches top_p (nucleus), renormalised; one draw per row.
"""
from __future__ import annotations

from typing import Optional

import torch


def check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """Set to -inf every logit outside the top_k and outside the top_p nucleus. logits: [B, vocab] -> [B, vocab]."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep a token while the mass BEFORE it is below top_p: the most likely token always stays
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k, top_p, generator=None) -> torch.Tensor:
    # logits: [B, vocab] -> [B] long
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None) -> torch.Tensor:
    """Continue every row of input_ids [B, T] (T >= 1) by up to max_new_tokens tokens -> [B, T + n].

    n = max_new_tokens, or fewer when eos_id is given and every row has produced it (rows that ended earlier are
    padded with eos_id). generator: a torch.Generator for reproducible sampling.
    """
    # input_ids: [B, T] long -> [B, T + n] long
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [B, T] with T >= 1, got {tuple(input_ids.shape)}")
    was_training = model.training
    model.eval()
    B, T = input_ids.shape
    out = input_ids.new_empty(B, T + max_new_tokens)   # filled in place: no per-token copy of the sequence
    out[:, :T] = input_ids
    cache, step_input, end = model.new_cache(), input_ids, T
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        h = model.hidden_states(step_input, cache=cache)[:, -1]                    # [B, D]
        token = next_token(h @ model.head_weight.t(), temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        out[:, end] = token
        end += 1
        if eos_id is not None and bool(finished.all()):
            break
        step_input = token[:, None]
    model.train(was_training)
    return out[:, :end]
