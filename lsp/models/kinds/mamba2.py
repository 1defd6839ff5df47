"""`mamba2`: the Mamba-2 (SSD) mixer (Dao & Gu 2024; the mixer of Nemotron-H, Granite-4.0-H, Jamba-style hybrids)
on the scalar-decay linear-attention op. Per head h of P = head_dim channels, state size N, G groups sharing B, C:

    z, xBC, dt = in_proj(x)                                   I = H·P gate channels, I + 2·G·N conv channels, H
    x, B, C    = silu(short_conv(xBC) + conv_bias)            causal depthwise conv, kernel delta_conv_size
    dt         = softplus(dt + dt_bias),  A = -exp(A_log)     [B, T, H]
    S_t        = exp(dt_t A) S_{t-1} + B_t (dt_t x_t)ᵀ         linear_attention(q = C, k = B, v = x·dt, g = dt·A),
    y_t        = C_t S_t + D x_t                                scale 1
    out        = out_proj(RMSNorm_per_group(y · silu(z)))      gated RMSNorm, norm after the gate

A segment's map is a scalar per head (exp Σ dt·A): SP exchanges states and total decays, and the conv takes its halo
from the previous segment; decoding keeps the state and the conv's last k - 1 inputs (`DeltaState`, the same pair).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lsp.names import CHUNK_SIZE
from lsp.ops import linear_attention
from lsp.parallel import sp_linear_attention

from ..cache import DeltaState, check_decoding, recurrent_step
from ..linear_kind import LinearKind, Recurrence, accumulation_dtype, causal_conv, register_kind


def gated_group_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int, eps: float):
    """Mamba-2's gated RMSNorm, gate before the norm: RMSNorm(y · silu(z)) over each of `groups` channel groups.
    y, z: [B, T, I]; weight: [I] -> [B, T, I] (statistics in fp32, fp64 for fp64 inputs)."""
    dtype = accumulation_dtype(y)
    gated = (y.to(dtype) * F.silu(z.to(dtype))).unflatten(-1, (groups, -1))
    normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps)
    return normed.flatten(-2).to(y.dtype) * weight


@register_kind
class Mamba2(LinearKind):
    name = "mamba2"
    state_map = "scalar"
    recurrence = Recurrence(single=linear_attention, parallel=sp_linear_attention, step=recurrent_step)

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        H, D, k = cfg.num_heads, cfg.hidden_size, cfg.delta_conv_size
        inner, conv = self.widths(cfg)
        self.in_proj = nn.Linear(D, inner + conv + H, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(conv, k).uniform_(-k**-0.5, k**-0.5))   # Conv1d's default
        self.conv_bias = nn.Parameter(torch.empty(conv).uniform_(-k**-0.5, k**-0.5))
        # S4D-real A = 1..H and dt ~ log-uniform [1e-3, 0.1] through dt_bias = softplus^-1(dt), as Mamba-2 inits
        self.A_log = nn.Parameter(torch.arange(1, H + 1, dtype=torch.float32).log())
        dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm_weight = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, D, bias=False)

    @staticmethod
    def widths(cfg) -> tuple[int, int]:
        """(I, conv channels): the gate / output width H·P and the conv's I + 2·G·N (x, B, C)."""
        inner = cfg.num_heads * cfg.head_dim
        return inner, inner + 2 * cfg.ssm_groups * cfg.ssm_state_size

    def op_inputs(self, x, *, sp=None, cu_seqlens=None, cache=None) -> tuple:
        # x: [B, T, D] -> q = C, k = B [B, T, H, N], v = x·dt [B, T, H, P], g = dt·A [B, T, H]; z [B, T, I] and
        # the conv's x [B, T, H, P] for the output path
        cfg, (Bsz, T, _) = self.cfg, x.shape
        H, P, N, G = cfg.num_heads, cfg.head_dim, cfg.ssm_state_size, cfg.ssm_groups
        inner, conv = self.widths(cfg)
        z, xBC, dt = self.in_proj(x).split([inner, conv, H], dim=-1)
        xBC = causal_conv(xBC, self.conv_weight, sp=sp, cu_seqlens=cu_seqlens, cache=cache)
        xBC = F.silu(xBC + self.conv_bias.to(xBC.dtype))              # the projection's dtype (bf16 under autocast)
        xs, Bm, Cm = xBC.split([inner, G * N, G * N], dim=-1)
        xs = xs.view(Bsz, T, H, P)
        # head h reads group h // (H / G), as Mamba-2's grouped B, C
        Bm, Cm = (t.view(Bsz, T, G, N).repeat_interleave(H // G, dim=2) for t in (Bm, Cm))
        dtype = accumulation_dtype(x)
        dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))
        g = -self.A_log.to(dtype).exp() * dt
        return (Cm, Bm, xs * dt[..., None].to(xs.dtype), g), (z, xs)

    def forward(self, x, positions=None, sp=None, cu_seqlens=None, cache=None):
        # x: [B, T, D] -> [B, T, D]. Mamba-2's output reads z and the conv's x besides o (the gate and the D skip),
        # so op_inputs hands them over here; the recurrence runs through the one dispatch, at scale 1 (y = C S).
        if cache is not None:
            check_decoding(sp, cu_seqlens)
        args, (z, xs) = self.op_inputs(x, sp=sp, cu_seqlens=cu_seqlens, cache=cache)
        o = self.recurrence.run(args, scale=1.0, backend=self.cfg.linear_backend, sp=sp, cu_seqlens=cu_seqlens,
                                cache=cache)
        y = (o + xs * self.D.to(xs.dtype)[:, None]).flatten(-2)
        return self.out_proj(gated_group_rms_norm(y, z, self.norm_weight, self.cfg.ssm_groups, self.cfg.norm_eps))

    def new_cache(self) -> DeltaState:
        return DeltaState()

    # ------------------------------------------------------------------------------------------ formulas
    @classmethod
    def state_dims(cls, cfg) -> tuple[int, int]:
        return cfg.ssm_state_size, cfg.head_dim

    @classmethod
    def matmul_weights(cls, cfg) -> int:
        # in_proj (z, x, B, C, dt) and out_proj
        inner, conv = cls.widths(cfg)
        return cfg.hidden_size * (inner + conv + cfg.num_heads) + inner * cfg.hidden_size

    @classmethod
    def other_parameters(cls, cfg) -> int:
        # conv weight and bias, A_log, dt_bias, D, the gated norm's weight
        inner, conv = cls.widths(cfg)
        return conv * (cfg.delta_conv_size + 1) + 3 * cfg.num_heads + inner

    @classmethod
    def attention_flops_per_token(cls, cfg, seq_len: int) -> float:
        # the default chunked count with K = N (keys are B) and V = P
        H, N, P, C = cfg.num_heads, cfg.ssm_state_size, cfg.head_dim, min(CHUNK_SIZE, seq_len)
        return 6 * H * (C * (N + P) + 2 * N * P)

    @classmethod
    def saved_bytes(cls, cfg, backend: str) -> dict:
        """Estimated from the tensors the layer keeps (not hook-counted like the decay and delta families): per
        token the bf16 in_proj input and output, the conv input and output, silu, the repeated B and C, v, dt and
        the gated norm (fp32) 2·D + 2·(2·I + 2·conv + H) + 4·H·(2·N + P) + 16·I + 16·H; the chunked core's
        per-padded-token terms and the per-segment state as `DecayKind.saved_bytes` with K = N, V = P. Checked
        through the peak it feeds: `lsp plan --measure` on configs/tiny-mamba2-cpu.yaml models 0.93 of the measured
        peak (tests/plan/test_measure.py, within 15%)."""
        D, H, N, P, C = cfg.hidden_size, cfg.num_heads, cfg.ssm_state_size, cfg.head_dim, CHUNK_SIZE
        inner, conv = cls.widths(cfg)
        own = 2 * D + 2 * (2 * inner + 2 * conv + H) + 4 * H * (2 * N + P) + 16 * inner + 16 * H
        segment = 4 * H * N * P
        if backend == "triton":
            return {"token": own + 2 * H * (2 * N + P) + 4 * H, "padded": 0, "segment": segment, "keys": 0}
        return {"token": own, "keys": 0, "segment": segment, "incoming": 2 * H * (N + 2 * P),
                "padded": 2 * H * (12 * N + 13 * P) + 4 * H * C + 4 * H * N / C + 8 * H * N * P / C}

    @classmethod
    def exchange_payload(cls, cfg, rows: int, act_bytes: float) -> dict:
        # one total decay per head (fp32); the conv halo: one segment's last k - 1 inputs of the x, B, C channels
        _, conv = cls.widths(cfg)
        return {"decay_bytes": rows * cfg.num_heads * 4,
                "halo_bytes": rows * (cfg.delta_conv_size - 1) * conv * act_bytes}
