"""Building blocks of `HybridLM`: RMSNorm, RoPE, SwiGLU and the two attention kinds.

Both attention layers take `x: [B, T, D]` plus the global token positions of its rows and, when `sp` is given,
run sequence-parallel on the local shard (the same sharding for both kinds, so the model shards once). With
`cache` (one process, no packing) they continue a sequence from their decoding state instead: see `cache.py`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lsp.names import DELTA_VARIANTS as DELTA_ATTN
from lsp.ops import delta_rule, linear_attention, softmax_attention
from lsp.ops.delta import short_conv
from lsp.ops.softmax import causal_suffix_attention

from .cache import (
    DeltaState,
    KVCache,
    RecurrentState,
    check_decoding,
    continue_conv,
    delta_recurrent_step,
    recurrent_step,
)
from .config import HybridConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) * weight, computed in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]
        xf = x if x.dtype == torch.float64 else x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (Llama / GPT-NeoX half-split convention) at the given token positions.

    x: [B, T, H, D]; positions: [B, T] long (global positions). Pair (x_i, x_{i+D/2}) is rotated by the angle
    p · theta^(-2i/D). Angles in fp32 (fp64 for fp64 x), so large positions keep their precision.
    """
    D = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=dtype) / D)
    angles = positions.to(dtype)[..., None] * inv_freq                          # [B, T, D/2]
    emb = torch.cat((angles, angles), dim=-1)[:, :, None, :]                    # [B, T, 1, D]
    xf = x.to(dtype)
    return (xf * emb.cos() + rotate_half(xf) * emb.sin()).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, D]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention with GQA and RoPE at global positions."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        H, Hkv, Dh, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)

    def new_cache(self) -> KVCache:
        return KVCache()

    def forward(self, x, positions, sp=None, cu_seqlens=None, cache=None):
        # x: [B, T, D]; positions: [B, T] long -> [B, T, D]
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(B, T, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
        if cache is not None:
            check_decoding(sp, cu_seqlens)
            # the new queries are the last T of all positions so far: bottom-right causal over the cached keys
            o = causal_suffix_attention(q, *cache.append(k, v))
        elif sp is None:
            o = softmax_attention(q, k, v, causal=True, cu_seqlens=cu_seqlens)
        else:
            from lsp.parallel import sp_softmax_attention
            o = sp_softmax_attention(q, k, v, sp=sp, causal=True, cu_seqlens=cu_seqlens)
        return self.o_proj(o.reshape(B, T, -1))


def lightning_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Fixed per-head decay rates of Lightning Attention / TransNormerLLM: ALiBi slopes 2^(-8h/H), h = 1..H,
    scaled by (1 - l / (L - 1) + 1e-5) so that deeper layers decay more slowly. Returns [H] rates > 0; log-decay
    is g = -rate."""
    # ALiBi's closed form for a power-of-two head count, interleaved as in the ALiBi paper otherwise.
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_2(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: num_heads - closest]
    depth = 1 - layer_idx / (num_layers - 1) + 1e-5 if num_layers > 1 else 1.0
    return torch.tensor(slopes, dtype=torch.float64) * depth


def lightning_log_decay(cfg: HybridConfig, layer_idx: int) -> torch.Tensor:
    """Lightning's fixed log-decay of layer layer_idx, [H] fp32 (a buffer: derived from the config, not saved)."""
    return -lightning_slopes(cfg.num_heads, layer_idx, cfg.num_layers).float()


class LinearAttention(nn.Module):
    """Gated linear attention layer (GLA / Lightning style), all heads of size head_dim for q, k and v.

    Feature maps and decays per `cfg.linear_attn`:
      linear     : q, k L2-normalised per head, no decay (g = None). Normalised q, k keep every score in [-1, 1];
                   the output RMSNorm removes the growth of the un-decayed state with length.
      lightning  : q, k = silu(proj) (TransNormerLLM), fixed per-head log-decay g[h] = -lightning_slopes.
      simple_gla : g[b, t, h] = logsigmoid(w_h · x_t + b_h) / gate_logit_normalizer (data-dependent scalar).
      gla        : g[b, t, h, :] = logsigmoid(W2 W1 x_t + b) / gate_logit_normalizer (per key dim, low rank).
    Output: per-head RMSNorm, times swish(gate_proj(x)) (GLA output gate), then o_proj. scale = head_dim^-0.5.
    """

    def __init__(self, cfg: HybridConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        H, Dh, D = cfg.num_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, H * Dh, bias=False)
        self.v_proj = nn.Linear(D, H * Dh, bias=False)
        self.gate_proj = nn.Linear(D, H * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)
        self.o_norm = RMSNorm(Dh, cfg.norm_eps)
        if cfg.linear_attn == "lightning":
            self.register_buffer("log_decay", lightning_log_decay(cfg, layer_idx), persistent=False)
        elif cfg.linear_attn == "simple_gla":
            self.decay_proj = nn.Linear(D, H, bias=True)
        elif cfg.linear_attn == "gla":
            self.decay_down = nn.Linear(D, cfg.gate_low_rank_dim, bias=False)
            self.decay_up = nn.Linear(cfg.gate_low_rank_dim, H * Dh, bias=True)

    def decay(self, x: torch.Tensor) -> torch.Tensor | None:
        # x: [B, T, D] -> None | [H] | [B, T, H] | [B, T, H, Dh]  (log-decay <= 0)
        # decays stay in fp32 (fp64 for fp64 x): cumulative sums of bf16 log-decays drift over long sequences
        B, T, _ = x.shape
        kind, norm = self.cfg.linear_attn, self.cfg.gate_logit_normalizer
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if kind == "linear":
            return None
        if kind == "lightning":
            return self.log_decay.to(dtype)
        if kind == "simple_gla":
            return F.logsigmoid(self.decay_proj(x).to(dtype)) / norm
        logits = self.decay_up(self.decay_down(x)).to(dtype)
        return (F.logsigmoid(logits) / norm).view(B, T, self.cfg.num_heads, -1)

    def new_cache(self) -> RecurrentState:
        return RecurrentState()

    def forward(self, x, positions=None, sp=None, cu_seqlens=None, cache=None):
        # x: [B, T, D] -> [B, T, D]   (positions unused: decay, not RoPE, encodes order)
        B, T, _ = x.shape
        cfg = self.cfg
        shape = (B, T, cfg.num_heads, cfg.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        if cfg.linear_attn == "linear":
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        elif cfg.linear_attn == "lightning":
            q, k = F.silu(q), F.silu(k)
        g = self.decay(x)
        scale = cfg.head_dim ** -0.5
        if cache is not None:
            check_decoding(sp, cu_seqlens)
            o = self.continue_from(cache, q, k, v, g, scale)
        elif sp is None:
            o, _ = linear_attention(q, k, v, g, scale=scale, cu_seqlens=cu_seqlens, backend=cfg.linear_backend)
        else:
            from lsp.parallel import sp_linear_attention
            o, _ = sp_linear_attention(q, k, v, g, sp=sp, scale=scale,
                                       cu_seqlens=cu_seqlens, backend=cfg.linear_backend)
        o = self.o_norm(o) * F.silu(self.gate_proj(x)).view(shape)
        return self.o_proj(o.reshape(B, T, -1))

    def continue_from(self, cache: RecurrentState, q, k, v, g, scale):
        # q, k, v: [B, T, H, Dh] -> o [B, T, H, Dh]; cache.state [B, H, Dh, Dh] advanced past these T tokens
        if q.shape[1] == 1:   # one generated token: the recurrence itself, O(1) whatever came before
            o, cache.state = recurrent_step(q, k, v, g, scale, cache.state)
            return o
        o, cache.state = linear_attention(q, k, v, g, scale=scale, initial_state=cache.state,
                                          output_final_state=True, backend=self.cfg.linear_backend)
        return o


class DeltaNetAttention(nn.Module):
    """DeltaNet / Gated DeltaNet layer (Yang et al. 2024, 2025; the Gated DeltaNet of Qwen3-Next), heads of head_dim.

      q, k, v = silu(short_conv(proj(x)))      causal depthwise conv, kernel cfg.delta_conv_size, per document
      q, k    = L2-normalised per head         (unit keys with beta in (0, 1) keep the state map contractive)
      beta    = sigmoid(b_proj(x))             [B, T, H] write strength
      g       = -exp(A_log) · softplus(a_proj(x) + dt_bias)     [B, T, H], gated_deltanet only (Mamba-2 style)
      o       = o_proj(RMSNorm(delta_rule(q, k, v, beta, g)) * silu(gate_proj(x)))
    Under SP the conv takes its halo from the previous segment and the delta rule runs `sp_delta_rule`. Decoding
    (`cache`, a DeltaState) takes the conv's halo from the cached tail and enters the delta rule with the cached state.
    """

    def __init__(self, cfg: HybridConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        H, Dh, D, k = cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.delta_conv_size
        self.qkv_proj = nn.Linear(D, 3 * H * Dh, bias=False)
        self.b_proj = nn.Linear(D, H, bias=True)
        self.gate_proj = nn.Linear(D, H * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)
        self.o_norm = RMSNorm(Dh, cfg.norm_eps)
        self.conv_weight = nn.Parameter(torch.empty(3 * H * Dh, k).uniform_(-k**-0.5, k**-0.5))  # Conv1d's default
        if cfg.linear_attn == "gated_deltanet":
            self.a_proj = nn.Linear(D, H, bias=False)
            # decay rates A ~ U(0, 16) and time steps dt ~ log-uniform [1e-3, 0.1] (dt_bias = softplus^-1(dt))
            self.A_log = nn.Parameter(torch.empty(H).uniform_(1e-4, 16).log())
            dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))

    def decay(self, x: torch.Tensor) -> torch.Tensor | None:
        # x: [B, T, D] -> None | [B, T, H] log-decay <= 0, in fp32 (fp64 for fp64 x) like LinearAttention.decay
        if self.cfg.linear_attn != "gated_deltanet":
            return None
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return -self.A_log.to(dtype).exp() * F.softplus(self.a_proj(x).to(dtype) + self.dt_bias.to(dtype))

    def new_cache(self) -> DeltaState:
        return DeltaState()

    def forward(self, x, positions=None, sp=None, cu_seqlens=None, cache=None):
        # x: [B, T, D] -> [B, T, D]   (positions unused: the conv and the decay encode order)
        B, T, _ = x.shape
        cfg = self.cfg
        shape = (B, T, cfg.num_heads, cfg.head_dim)
        qkv = self.qkv_proj(x)
        if cache is not None:
            check_decoding(sp, cu_seqlens)
            qkv, cache.conv_tail = continue_conv(qkv, self.conv_weight, cache.conv_tail)
        elif sp is None:
            qkv = short_conv(qkv, self.conv_weight, cu_seqlens=cu_seqlens)
        else:
            from lsp.parallel import sp_short_conv
            qkv = sp_short_conv(qkv, self.conv_weight, sp=sp, cu_seqlens=cu_seqlens)
        q, k, v = (t.view(shape) for t in F.silu(qkv).chunk(3, dim=-1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta, g = torch.sigmoid(self.b_proj(x)), self.decay(x)
        kwargs = dict(scale=cfg.head_dim ** -0.5, cu_seqlens=cu_seqlens, backend=cfg.linear_backend)
        if cache is not None:
            o = self.continue_from(cache, q, k, v, beta, g, kwargs["scale"])
        elif sp is None:
            o, _ = delta_rule(q, k, v, beta, g, **kwargs)
        else:
            from lsp.parallel import sp_delta_rule
            o, _ = sp_delta_rule(q, k, v, beta, g, sp=sp, **kwargs)
        o = self.o_norm(o) * F.silu(self.gate_proj(x)).view(shape)
        return self.o_proj(o.reshape(B, T, -1))

    def continue_from(self, cache: DeltaState, q, k, v, beta, g, scale):
        # q, k, v: [B, T, H, Dh]; beta, g: [B, T, H] -> o [B, T, H, Dh]; cache.state advanced past these T tokens
        if q.shape[1] == 1:   # one generated token: one step of the recurrence, O(1) whatever came before
            o, cache.state = delta_recurrent_step(q, k, v, beta, g, scale, cache.state)
            return o
        o, cache.state = delta_rule(q, k, v, beta, g, scale=scale, initial_state=cache.state,
                                    output_final_state=True, backend=self.cfg.linear_backend)
        return o


def linear_layer(cfg: HybridConfig, layer_idx: int) -> nn.Module:
    """The `L` layer of `cfg.linear_attn`: a delta-rule layer or a (gated) linear-attention layer."""
    return DeltaNetAttention(cfg, layer_idx) if cfg.linear_attn in DELTA_ATTN else LinearAttention(cfg, layer_idx)
