"""`LinearKind`: what every linear layer kind is, the one dispatch they share, and the registry of kinds.

A kind (`model.linear_attn`) is one subclass, registered once with `@register_kind`, that holds everything the
rest of lsp asks of it:

* the layer: its projections and parameters, short convolutions, feature maps and gates (`op_inputs`), the
  recurrence it runs (`recurrence`, a `Recurrence`), its output path (`output`), its decoding state (`new_cache`)
  and any buffer derived from the config rather than saved (`reset_buffers`, what a Hugging Face load restores);
* the formulas of the planner (lsp/plan) and the FLOP counter (lsp/models/flops.py), as class methods of the
  config: `matmul_weights`, `other_parameters`, `attention_flops_per_token`, `saved_bytes`, `exchange_payload`,
  and `state_map`, the form of a segment's affine map S_out = A·S_in + B (identity, scalar, diagonal or dense A),
  by which the planner prices the SP exchange and the op's counted FLOPs.

`forward` is written once here: `op_inputs` -> `recurrence.run` (single device, SP or decoding) -> `output`; a kind
never branches on sp / cache itself (`causal_conv` is the same three-way path for short convolutions).
Names: the torch-free list lives in `lsp.kinds` (built-in kinds are the files of lsp/models/kinds/).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from lsp import kinds as kind_registry
from lsp.names import CHUNK_SIZE
from lsp.ops.delta import short_conv
from lsp.parallel import sp_short_conv

from .cache import check_decoding, continue_conv
from .config import HybridConfig, HybridConfigError


@dataclass(frozen=True)
class Recurrence:
    """A linear recurrence in the three forms a layer runs it. Contract of each (lsp.ops / lsp.parallel):

        single(q, k, v, *gates, scale, initial_state, output_final_state, cu_seqlens, backend) -> (o, S)
        parallel(q, k, v, *gates, sp, scale, cu_seqlens, backend) -> (o_local, S)       (same, on the local shard)
        step(q, k, v, *gates, scale, state) -> (o, S)                                    (one token, T = 1)
    """
    single: Callable
    parallel: Callable
    step: Callable

    def run(self, args: tuple, *, scale: float, backend: str, sp=None, cu_seqlens=None, cache=None):
        """The one dispatch: decoding (`cache`, its `state` advanced in place), SP (`sp`) or one device."""
        # args: (q [B, T, H, K], k, v [B, T, H, V], *gates) -> o [B, T, H, V]
        if cache is not None:
            if args[0].shape[1] == 1:   # one generated token: the recurrence itself, O(1) whatever came before
                o, cache.state = self.step(*args, scale, cache.state)
                return o
            o, cache.state = self.single(*args, scale=scale, initial_state=cache.state, output_final_state=True,
                                         backend=backend)
            return o
        if sp is None:
            return self.single(*args, scale=scale, cu_seqlens=cu_seqlens, backend=backend)[0]
        return self.parallel(*args, sp=sp, scale=scale, cu_seqlens=cu_seqlens, backend=backend)[0]


def causal_conv(x: torch.Tensor, weight: torch.Tensor, *, sp=None, cu_seqlens=None, cache=None) -> torch.Tensor:
    """Short causal depthwise convolution, per document, in the same three forms: decoding continues from
    `cache.conv_tail` (updated in place), SP takes its halo from the previous segment, else the plain conv."""
    # x: [B, T, C]; weight: [C, k] -> [B, T, C]
    if cache is not None:
        y, cache.conv_tail = continue_conv(x, weight, cache.conv_tail)
        return y
    if sp is None:
        return short_conv(x, weight, cu_seqlens=cu_seqlens)
    return sp_short_conv(x, weight, sp=sp, cu_seqlens=cu_seqlens)


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """Gates and decays stay in fp32 (fp64 for fp64 x): cumulative sums of bf16 log-decays drift over long runs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class LinearKind(nn.Module):
    """Base of every linear layer kind (module docstring). x: [B, T, D] -> [B, T, D]; positions are unused (the
    recurrence, not RoPE, encodes order) but accepted so that every attention layer has one signature."""

    name: str = ""                 # the `model.linear_attn` value, set by each registered subclass
    state_map: str = ""            # identity | scalar | diagonal | dense: the form of a segment's map A
    op_family: str = ""            # the planner's model of its op (lsp.plan.planner.OP_FAMILIES) when the form of
    #                                A does not say it ("" = state_map's; RWKV-7: "dplr", dense but not the delta rule)
    recurrence: Recurrence         # the op, in its three forms
    grouped_value_heads = False    # whether it runs num_v_heads > num_heads value heads (the delta rule does)
    has_kernels = True             # whether its op's Triton kernels take its inputs (KDA's gate per key: no, torch)
    shared_values: tuple = ()      # names of per-token values it reads from / writes for other layers of one
    #                                forward (RWKV-7's value residual: "v_first"); a kind that names any takes
    #                                `shared=` (HybridLM's `SharedValues` of the forward) in forward

    def __init__(self, cfg: HybridConfig, layer_idx: int):
        super().__init__()
        if cfg.num_v_heads != cfg.num_heads and not self.grouped_value_heads:
            raise HybridConfigError("num_v_heads", f"{cfg.num_v_heads} != {{p}}num_heads={cfg.num_heads}: linear kind "
                                    f"{self.name!r} has one value head per q/k head")
        self.cfg, self.layer_idx = cfg, layer_idx

    # ------------------------------------------------------------------------------------------- the layer
    def op_inputs(self, x, *, sp=None, cu_seqlens=None, cache=None) -> tuple:
        """The recurrence's positional inputs (q, k, v, *gates) of x [B, T, D]: projections, short convolutions
        (through `causal_conv`, which needs sp / cu_seqlens / cache), feature maps and gates."""
        raise NotImplementedError(f"{type(self).__name__} must define op_inputs")

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, V] of the recurrence and the layer input x [B, T, D] -> the layer output [B, T, D]."""
        raise NotImplementedError(f"{type(self).__name__} must define output")

    def new_cache(self):
        """An empty decoding state (lsp/models/cache.py states the contract)."""
        raise NotImplementedError(f"{type(self).__name__} must define new_cache")

    def reset_buffers(self) -> None:
        """Recompute the buffers derived from the config (not saved); none by default."""

    def forward(self, x, positions=None, sp=None, cu_seqlens=None, cache=None):
        # x: [B, T, D] -> [B, T, D]
        if cache is not None:
            check_decoding(sp, cu_seqlens)
        args = self.op_inputs(x, sp=sp, cu_seqlens=cu_seqlens, cache=cache)
        o = self.recurrence.run(args, scale=self.cfg.head_dim ** -0.5, backend=self.cfg.linear_backend, sp=sp,
                                cu_seqlens=cu_seqlens, cache=cache)
        return self.output(o, x)

    # ------------------------------------------------------------------- formulas (planner, FLOP counter)
    @classmethod
    def matmul_weights(cls, cfg: HybridConfig) -> int:
        """Weights of the matmuls one token goes through in this layer (6 training FLOPs each)."""
        raise NotImplementedError(f"{cls.__name__} must define matmul_weights")

    @classmethod
    def other_parameters(cls, cfg: HybridConfig) -> int:
        """Parameters outside those matmuls: norm weights, biases, convolutions, per-head constants."""
        raise NotImplementedError(f"{cls.__name__} must define other_parameters")

    @classmethod
    def first_layer_difference(cls, cfg: HybridConfig) -> tuple[int, int]:
        """(matmul weights, other parameters) the first layer of this kind in a model has beyond every later one:
        not 0 for a kind whose first layer writes a shared value that the later ones mix in (RWKV-7)."""
        return 0, 0

    @classmethod
    def state_dims(cls, cfg: HybridConfig) -> tuple[int, int]:
        """(K, V) of the recurrence's state per head, what an SP exchange sends per head: head_dim x head_dim."""
        return cfg.head_dim, cfg.head_dim

    @classmethod
    def attention_flops_per_token(cls, cfg: HybridConfig, seq_len: int) -> float:
        """Training FLOPs per token of the recurrence (for MFU). Default, the chunked path with chunk
        C = min(64, T) and K = V = Dh, per head: intra-chunk scores 2CK and their product with V 2CV (the full
        C x C block is computed, then masked), read-out q S 2KV, state update kᵀ v 2KV; x 3 for the backward.
        Per value head: num_v_heads, which only the delta kinds let differ from num_heads."""
        H, Dh, C = cfg.num_v_heads, cfg.head_dim, min(CHUNK_SIZE, seq_len)
        return 6 * H * (C * (Dh + Dh) + 2 * Dh * Dh)

    @classmethod
    def saved_bytes(cls, cfg: HybridConfig, backend: str) -> dict:
        """Bytes autograd keeps for the layer itself (its block's norms and MLP are the planner's), split as in
        `lsp.plan.planner.saved_bytes`: token, padded, segment, keys (and optionally incoming)."""
        raise NotImplementedError(f"{cls.__name__} must define saved_bytes")

    @classmethod
    def exchange_payload(cls, cfg: HybridConfig, rows: int, act_bytes: float) -> dict:
        """What one SP exchange of this layer sends besides its [K, V] states, for `rows` batch rows:
        decay_bytes (A as a vector: 4 bytes per head and gate dim; 0 for a dense A, which travels as maps) and
        halo_bytes (the short convolutions' last k - 1 inputs of one segment, activations of act_bytes)."""
        raise NotImplementedError(f"{cls.__name__} must define exchange_payload")


# ----------------------------------------------------------------------------------------------- registry
def register_kind(cls: type) -> type:
    """Class decorator: register a LinearKind subclass under `cls.name` (one class per name)."""
    if not (isinstance(cls, type) and issubclass(cls, LinearKind)):
        raise TypeError(f"register_kind takes a LinearKind subclass, got {cls!r}")
    kind_registry.add(cls.name, cls)
    return cls


def layer_kind(name: str) -> type:
    """The class of kind `name`; a built-in kind's file is imported on first use. Unknown name: ValueError."""
    if kind_registry.registered(name) is None and name in kind_registry.builtin_kind_names():
        importlib.import_module(f"{kind_registry.KINDS_PACKAGE}.{name}")
        if kind_registry.registered(name) is None:
            raise ValueError(f"lsp/models/kinds/{name}.py registers no kind named {name!r} (@register_kind with "
                             f"name = {name!r})")
    cls = kind_registry.registered(name)
    if cls is None:
        raise ValueError(f"unknown linear layer kind {name!r}; registered: {', '.join(layer_kinds())}")
    return cls


def layer_kinds() -> tuple:
    """The names of every registered linear layer kind (the choices of `model.linear_attn`)."""
    return kind_registry.kind_names()


def linear_layer(cfg: HybridConfig, layer_idx: int) -> LinearKind:
    """The linear layer at depth layer_idx, of the kind layer_pattern names there (`L`: cfg.linear_attn)."""
    return layer_kind(cfg.position_kinds[layer_idx])(cfg, layer_idx)
