"""`HybridLM`: a Llama-style decoder whose attention layers are linear (L) or softmax (S) per `layer_pattern`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from lsp.parallel import checkpoint_contexts

from .cache import DecodeCache
from .config import HybridConfig
from .layers import RMSNorm, SoftmaxAttention, SwiGLU
from .linear_kind import linear_layer
from .loss import LMHead, head_output
from .moe import MoE


@dataclass
class LMOutput:
    logits: torch.Tensor | None        # [B, T, vocab] (local shard under SP), or None when only the loss was asked
    loss: torch.Tensor | None          # [] mean over the non-ignored tokens of the GLOBAL sequence
    num_tokens: torch.Tensor | None    # [] global count of non-ignored tokens behind `loss`
    aux_loss: torch.Tensor | None = None  # [] MoE balancing losses (aux + z), already included in `loss`


class SharedValues:
    """The per-token values layers hand to later layers of one forward, by name (a kind's `shared_values`, e.g.
    RWKV-7's value residual `v_first`): `shared[name] = t`, `shared[name]`, `name in shared`. An object, not a dict:
    wrappers that map over a module's tensor inputs rebuild the containers they walk (FSDP2's cast of forward inputs
    to its param dtype makes a new dict), and a writer must write into the forward's own."""

    def __init__(self):
        self._values: dict = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._values[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self._values[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self._values


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: HybridConfig, layer_idx: int):
        super().__init__()
        self.kind = cfg.layer_types[layer_idx]
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = linear_layer(cfg, layer_idx) if self.kind == "L" else SoftmaxAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, positions, sp=None, cu_seqlens=None, cache=None, shared=None):
        # x: [B, T, D]; positions: [B, T] long -> ([B, T, D], MoE balancing loss [] or None);
        # cache: this layer's decoding state (see cache.py); shared: the forward's cross-layer values (HybridLM)
        attn_kw = {} if cache is None else {"cache": cache}   # layers without a decode path keep their signature
        if self.attn.shared_values:                          # only a layer that declares them takes them
            attn_kw["shared"] = shared
        x = x + self.attn(self.attn_norm(x), positions, sp=sp, cu_seqlens=cu_seqlens, **attn_kw)
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(self.mlp_norm(x), sp=sp)
            return x + y, aux
        return x + self.mlp(self.mlp_norm(x)), None


def token_positions(B: int, T: int, device, sp=None) -> torch.Tensor:
    """Global position of every token of a (local) batch: [B, T] long.

    Under SP, `sp.local_positions(T, device)` gives [R, T] (R virtual ranks folded into the batch as rows r*b + i
    in emulation, R = 1 for a real process group); each rank row is repeated for its B / R batch rows.
    """
    if sp is None:
        return torch.arange(T, device=device).expand(B, T)
    pos = sp.local_positions(T, device)
    if B % pos.shape[0] != 0:
        raise ValueError(f"input_ids batch ({B}) must be a multiple of the SP rows ({pos.shape[0]}): "
                         f"pass the local shard made by sp.shard(ids, dim=1)")
    return pos.repeat_interleave(B // pos.shape[0], dim=0)


class HybridLM(nn.Module):
    """Hybrid linear/softmax attention language model.

    forward(input_ids, labels=None, sp=None, cu_seqlens=None, return_logits=False) -> LMOutput

    * input_ids: [B, T] long; under SP the local shard `sp.shard(ids, dim=1)`.
    * labels: [B, T] long ALIGNED with input_ids: labels[b, t] is the target of position t (the data pipeline has
      already shifted them, labels[t] = ids[t + 1]); -100 is ignored. Being aligned, labels shard exactly like
      input_ids, so no token's target lives on another rank.
    * cu_seqlens: int32 [N + 1] global boundaries of packed documents (B == 1); attention and linear state do not
      cross a boundary.
    * loss: mean over the non-ignored tokens of the whole global sequence, identical on every SP rank and equal to
      the sp=None loss. Its gradient on each rank is that rank's share: parameter gradients must be SUMMED over the
      SP group (then averaged over data-parallel replicas); see docs/model.md.
    * logits: full [B, T, vocab] when labels is None or return_logits=True, else None (the loss is computed by a
      chunked cross-entropy that never materialises them).
    * cache: a `DecodeCache` from `new_cache()`: input_ids are the tokens that follow the `cache.seen` tokens already
      consumed (positions continue from there) and the cache is advanced past them; one process, no cu_seqlens.
      `generate()` is built on it.
    """

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg.hidden_size, cfg.vocab_size, cfg.ce_chunk_size)
        self.reset_parameters()

    @property
    def head_weight(self) -> torch.Tensor:
        # [vocab, D]
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def reset_parameters(self):
        """normal(0, initializer_range) weights, zero biases, unit norms; the projections that write into the
        residual stream (attention o_proj, MLP down_proj) get std / sqrt(2 * num_layers) (GPT-2 scaling)."""
        std = self.cfg.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                residual = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(module.weight, 0.0, std / math.sqrt(2 * self.cfg.num_layers) if residual else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoE):
                module.experts.reset_parameters(std, std / math.sqrt(2 * self.cfg.num_layers))

    def new_cache(self) -> DecodeCache:
        """An empty decoding state: one cache per layer (the layer's own `new_cache()`), nothing consumed yet."""
        missing = sorted({type(b.attn).__name__ for b in self.layers if not hasattr(b.attn, "new_cache")})
        if missing:
            raise ValueError(f"decoding is not implemented for {', '.join(missing)} layers (no new_cache(); "
                             "see lsp/models/cache.py for the contract)")
        return DecodeCache(layers=[block.attn.new_cache() for block in self.layers])

    def hidden_states(self, input_ids, sp=None, cu_seqlens=None, cache=None) -> torch.Tensor:
        # input_ids: [B, T] -> final-norm hidden states [B, T, D]
        return self._run_blocks(input_ids, sp, cu_seqlens, cache)[0]

    def _run_blocks(self, input_ids, sp=None, cu_seqlens=None, cache=None):
        # input_ids: [B, T] -> (final-norm hidden states [B, T, D], Σ MoE balancing losses [] or None)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if cache is None:
            positions = token_positions(B, T, input_ids.device, sp)
        else:
            positions = torch.arange(cache.seen, cache.seen + T, device=input_ids.device).expand(B, T)
        x, aux_total = self.embed(input_ids), None
        # per-token values a layer hands to later layers of this forward (`SharedValues`): the same tokens as x, so
        # they need no exchange under SP and no decoding state
        shared = SharedValues()
        for i, block in enumerate(self.layers):
            if cache is not None:
                x, aux = block(x, positions, sp=sp, cu_seqlens=cu_seqlens, cache=cache.layers[i], shared=shared)
            elif self.cfg.activation_checkpointing and torch.is_grad_enabled():
                # the recompute replays the SP exchanges of the forward instead of communicating again; a shared
                # value read inside a checkpointed block is the forward's (the recompute of a writer only rebinds
                # its name after every reader has run)
                x, aux = checkpoint(block, x, positions, sp, cu_seqlens, None, shared, use_reentrant=False,
                                    context_fn=checkpoint_contexts)
            else:
                x, aux = block(x, positions, sp=sp, cu_seqlens=cu_seqlens, shared=shared)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cache is not None:
            cache.seen += T
        return self.norm(x), aux_total

    def head(self, h, labels=None):
        """Logits [B, T, vocab], or with labels the chunked (loss_sum, count): in `lm_head`'s own forward when the
        head is untied (see `LMHead`: ZeRO-3 gathers its weight there); tied, with the embedding's weight."""
        if self.lm_head is not None:
            return self.lm_head(h, labels)
        return head_output(h, self.embed.weight, labels, chunk_size=self.cfg.ce_chunk_size)

    def generate(self, input_ids, max_new_tokens, **sampling) -> torch.Tensor:
        """input_ids [B, T] -> [B, T + max_new_tokens]: the prompt with its continuation (see `lsp.models.generate`;
        sampling: temperature=0 greedy, top_k, top_p, generator, eos_id)."""
        from .generate import generate
        return generate(self, input_ids, max_new_tokens, **sampling)

    def forward(self, input_ids, labels=None, sp=None, cu_seqlens=None, return_logits=False,
                cache=None) -> LMOutput:
        h, aux = self._run_blocks(input_ids, sp=sp, cu_seqlens=cu_seqlens, cache=cache)
        logits = self.head(h) if labels is None or return_logits else None
        if labels is None:
            return LMOutput(logits=logits, loss=None, num_tokens=None, aux_loss=aux)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)} "
                             f"(aligned targets), got {tuple(labels.shape)}")
        loss_sum, count = self.head(h, labels)
        totals = torch.stack([loss_sum, count.to(loss_sum.dtype)])
        if sp is not None:
            # sum over ranks, identity backward: each rank's gradient is its own tokens' share of the global mean
            totals = sp.all_reduce_sum(totals)
        loss = totals[0] / totals[1].clamp(min=1)
        if aux is not None:   # MoE balancing losses: global over the sequence, like the cross-entropy
            loss = loss + aux
        return LMOutput(logits=logits, loss=loss, num_tokens=totals[1].detach().long(), aux_loss=aux)
