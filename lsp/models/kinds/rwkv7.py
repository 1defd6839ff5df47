"""`rwkv7`: RWKV-7 "Goose" time mixing (Peng et al. 2025) on the diagonal-plus-low-rank delta rule
(`lsp.ops.dplr_delta_rule`), structured as fla's `RWKV7Attention`. Per head of K = V = head_dim channels:

    δ_t   = x_{t-1} - x_t                               token shift (x_{-1} = 0 at every document start)
    x_c   = x + δ ⊙ μ_c          c in r, w, k, v, a, g    one learned mix per branch
    r, k, v = W_r x_r, W_k x_k, W_v x_v
    w     = -e^{-1/2} · sigmoid(w0 + tanh(x_w W_w1) W_w2)   log-decay per key channel, in (-e^{-1/2}, 0)
    α     = sigmoid(a0 + x_a W_a1 W_a2)                     in-context learning rate
    v     ← v + (v_first - v) ⊙ sigmoid(v0 + x_v W_v1 W_v2)   value residual; the model's first rwkv7 layer sets
                                                             v_first (its own v) and mixes nothing
    κ̂     = normalize(k ⊙ k_k) per head,   k ← k ⊙ (1 + (α - 1) ⊙ k_a)
    S_t   = Diag(exp w_t) S_{t-1} + (κ̂_t ⊙ α_t)(-κ̂_tᵀ S_{t-1}) + k_t v_tᵀ,   o_t = r_tᵀ S_t
            (dplr_delta_rule(q = r, k, v, a = -κ̂, b = κ̂ ⊙ α, g = w), scale 1)
    out   = W_o((GroupNorm_per_head(o) + (Σ_K r ⊙ k ⊙ r_k) v) ⊙ gate),   gate = sigmoid(x_g W_g1) W_g2

The token shift is a causal convolution of kernel 2 with the fixed weights (1, -1) (`TOKEN_SHIFT`), run through
`causal_conv`: under SP its one-token halo comes from the previous segment, with packed documents it is zero at a
document start, and decoding keeps the last input as `DeltaState.conv_tail`. v_first crosses layers through
HybridLM's `shared` values (`shared_values`), so it mixes with any other kinds in `layer_pattern`. A segment's map
is a dense K x K matrix (the delta family of lsp.parallel.affine). The low-rank dimensions are fla's defaults
(`lora_ranks`). docs/model.md lists where lsp differs from fla's layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lsp.names import CHUNK_SIZE
from lsp.ops import dplr_delta_rule
from lsp.ops.dplr import DPLR_BACKENDS, dplr_flops_per_token
from lsp.parallel import sp_dplr_delta_rule

from ..cache import DeltaState, check_decoding, dplr_recurrent_step
from ..config import HybridConfigError
from ..linear_kind import LinearKind, Recurrence, accumulation_dtype, causal_conv, register_kind

TOKEN_SHIFT = (1.0, -1.0)               # conv weights on (x_{t-1}, x_t): δ_t = x_{t-1} - x_t
DECAY_SCALE = math.exp(-0.5)            # w = -e^{-1/2} sigmoid(.): RWKV-7's -softplus(-z) - 0.5 in log-log form
BRANCHES = ("r", "w", "k", "v", "a", "g")


def lora_ranks(cfg) -> dict:
    """Low-rank dims of the w, a, v LoRAs and the output gate: fla's defaults, from D = hidden_size and head_dim
    (multiples of 32, at least 32; w, a, v grow with head_dim / 64)."""
    D, factor = cfg.hidden_size, cfg.head_dim / 64

    def rank(scale, grow=True):
        return max(32, int(round(scale * D ** 0.5 * (factor if grow else 1) / 32) * 32))
    return {"w": rank(2.5), "a": rank(2.5), "v": rank(1.7), "g": rank(5, grow=False)}


@register_kind
class RWKV7(LinearKind):
    name = "rwkv7"
    state_map = "dense"
    op_family = "dplr"           # the planner's FLOPs of the DPLR chunks (lsp.ops.dplr.dplr_flops_per_token)
    has_kernels = False          # the DPLR op has no Triton kernel yet: the chunked torch path
    shared_values = ("v_first",)
    recurrence = Recurrence(single=dplr_delta_rule, parallel=sp_dplr_delta_rule, step=dplr_recurrent_step)

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        if cfg.linear_backend not in DPLR_BACKENDS:
            raise HybridConfigError("linear_backend", f"{cfg.linear_backend!r}: linear kind 'rwkv7' runs on "
                                    f"dplr_delta_rule, whose backends are {', '.join(DPLR_BACKENDS)}",
                                    tuple(DPLR_BACKENDS))
        D, H, Dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        inner, ranks = H * Dh, lora_ranks(cfg)
        # the first rwkv7 layer of the model sets v_first; every later one mixes it into its v
        self.first = self.name not in cfg.position_kinds[:layer_idx]
        self.mix = nn.Parameter(torch.zeros(len(BRANCHES), D))           # μ_r, μ_w, μ_k, μ_v, μ_a, μ_g
        self.r_proj, self.k_proj, self.v_proj = (nn.Linear(D, inner, bias=False) for _ in range(3))
        self.w_down, self.w_up = nn.Linear(D, ranks["w"], bias=False), nn.Linear(ranks["w"], inner, bias=False)
        self.a_down, self.a_up = nn.Linear(D, ranks["a"], bias=False), nn.Linear(ranks["a"], inner, bias=False)
        self.g_down, self.g_up = nn.Linear(D, ranks["g"], bias=False), nn.Linear(ranks["g"], inner, bias=False)
        self.w0, self.a0 = nn.Parameter(torch.zeros(inner)), nn.Parameter(torch.zeros(inner))
        if not self.first:
            self.v_down, self.v_up = nn.Linear(D, ranks["v"], bias=False), nn.Linear(ranks["v"], inner, bias=False)
            self.v0 = nn.Parameter(torch.zeros(inner))
        self.k_k, self.k_a = nn.Parameter(torch.zeros(inner)), nn.Parameter(torch.zeros(inner))
        self.r_k = nn.Parameter(torch.zeros(H, Dh))
        self.norm_weight, self.norm_bias = nn.Parameter(torch.ones(inner)), nn.Parameter(torch.zeros(inner))
        self.o_proj = nn.Linear(inner, D, bias=False)
        self.init_constants()

    @torch.no_grad()
    def init_constants(self) -> None:
        """fla's initialisation of the mixes, w0, a0, v0, k_k, k_a, r_k and the norm's weight (by depth); the
        matrices keep HybridLM's (normal, o_proj scaled by depth), which runs after this and touches only them."""
        cfg, D = self.cfg, self.cfg.hidden_size
        inner, Dh, L = self.k_k.numel(), cfg.head_dim, cfg.num_layers
        up, down = self.layer_idx / max(L - 1, 1), 1.0 - self.layer_idx / L       # 0 -> 1 and 1 -> ~0 with depth
        ddd = torch.arange(D) / D
        for i, power in enumerate((0.2, 0.9, 0.7, 0.7, 0.9, 0.2)):      # r, w, k, v, a, g
            self.mix[i] = 1.0 - ddd.pow(power * down)
        n = torch.arange(inner, dtype=torch.float32)
        linear = n / max(inner - 1, 1) - 0.5
        zigzag = ((n % Dh) - (Dh - 1) / 2) / ((Dh - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        self.w0.copy_(-6 + 6 * (n / max(inner - 1, 1)) ** (1 + up ** 0.3) + 0.5 + 2.5 * zigzag)
        self.a0.copy_(-0.19 + 0.3 * zigzag + 0.4 * linear)
        if not self.first:
            self.v0.copy_(0.73 - 0.4 * linear)
        self.k_k.copy_(0.71 - 0.1 * linear)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        self.norm_weight.fill_(((self.layer_idx + 1) / L) ** 0.7)

    # ------------------------------------------------------------------------------------------- the layer
    def op_inputs(self, x, *, sp=None, cu_seqlens=None, cache=None, shared=None) -> tuple:
        # x: [B, T, D] -> (r, k, v, a, b, w) of the DPLR op (r, k, a, b, w [B, T, H, K], v [B, T, H, V]) and
        # (r, k, v [B, T, H, Dh], gate [B, T, H·Dh]) for the output path
        B, T, D = x.shape
        shape = (B, T, self.cfg.num_heads, self.cfg.head_dim)
        shift = x.new_tensor(TOKEN_SHIFT).expand(D, 2)
        delta = causal_conv(x, shift, sp=sp, cu_seqlens=cu_seqlens, cache=cache)
        xr, xw, xk, xv, xa, xg = (x + delta * mu.to(x.dtype) for mu in self.mix)
        dtype = accumulation_dtype(x)
        w = -DECAY_SCALE * torch.sigmoid(self.w0.to(dtype) + self.w_up(torch.tanh(self.w_down(xw))).to(dtype))
        alpha = torch.sigmoid(self.a0.to(dtype) + self.a_up(self.a_down(xa)).to(dtype))
        gate = self.g_up(torch.sigmoid(self.g_down(xg)))
        r, k = self.r_proj(xr), self.k_proj(xk)
        v = self.value_residual(self.v_proj(xv), xv, shared)
        kk = F.normalize((k * self.k_k.to(k.dtype)).view(shape), dim=-1)
        k = (k * (1 + (alpha - 1) * self.k_a.to(dtype))).to(r.dtype)
        r, k, v, alpha, w = (t.view(shape) for t in (r, k, v, alpha, w))
        return (r, k, v, -kk, kk * alpha, w), (r, k, v, gate)

    def value_residual(self, v, xv, shared):
        # v, xv: [B, T, H·Dh], [B, T, D] -> v mixed towards the first rwkv7 layer's v (which that layer stores)
        if shared is None:
            raise ValueError(f"rwkv7 layer {self.layer_idx} shares its value residual with the model's other rwkv7 "
                             f"layers: pass shared= (a SharedValues or a dict, as HybridLM does)")
        if self.first:
            shared["v_first"] = v
            return v
        dtype = accumulation_dtype(v)
        mix = torch.sigmoid(self.v0.to(dtype) + self.v_up(self.v_down(xv)).to(dtype))
        return (v + (shared["v_first"] - v) * mix).to(v.dtype)

    def output(self, o, r, k, v, gate):
        # o, r, k, v: [B, T, H, Dh]; gate: [B, T, H·Dh] -> [B, T, D]
        B, T, H, Dh = o.shape
        dtype = accumulation_dtype(o)
        normed = F.group_norm(o.reshape(B * T, H * Dh).to(dtype), H, self.norm_weight.to(dtype),
                              self.norm_bias.to(dtype), eps=Dh * self.cfg.norm_eps).view(B, T, H, Dh)
        bonus = (r * k * self.r_k.to(r.dtype)).sum(-1, keepdim=True) * v
        return self.o_proj(((normed.to(o.dtype) + bonus).flatten(-2) * gate))

    def forward(self, x, positions=None, sp=None, cu_seqlens=None, cache=None, shared=None):
        # x: [B, T, D] -> [B, T, D]. The output reads r, k, v and the gate besides o (the bonus term), so
        # op_inputs hands them over here; the recurrence runs through the one dispatch, at scale 1 (o = rᵀ S).
        if cache is not None:
            check_decoding(sp, cu_seqlens)
        args, (r, k, v, gate) = self.op_inputs(x, sp=sp, cu_seqlens=cu_seqlens, cache=cache, shared=shared)
        o = self.recurrence.run(args, scale=1.0, backend=self.cfg.linear_backend, sp=sp, cu_seqlens=cu_seqlens,
                                cache=cache)
        return self.output(o, r, k, v, gate)

    def new_cache(self) -> DeltaState:
        return DeltaState()           # the state and the token shift's last input (conv_tail [B, 1, D])

    # ------------------------------------------------------------------------------------------ formulas
    @classmethod
    def value_lora(cls, cfg) -> tuple[int, int]:
        # (weights, other) of the value residual's LoRA and v0, which every rwkv7 layer but the first has
        inner, rank = cfg.num_heads * cfg.head_dim, lora_ranks(cfg)["v"]
        return (cfg.hidden_size + inner) * rank, inner

    @classmethod
    def matmul_weights(cls, cfg) -> int:
        # r, k, v, o_proj and the w, a, v LoRAs and the gate's (a layer after the first)
        D, inner, ranks = cfg.hidden_size, cfg.num_heads * cfg.head_dim, lora_ranks(cfg)
        return 4 * D * inner + (D + inner) * sum(ranks.values())

    @classmethod
    def other_parameters(cls, cfg) -> int:
        # the six mixes, w0, a0, v0, k_k, k_a, r_k, the group norm's weight and bias
        return 6 * cfg.hidden_size + 8 * cfg.num_heads * cfg.head_dim

    @classmethod
    def first_layer_difference(cls, cfg) -> tuple[int, int]:
        weights, other = cls.value_lora(cfg)
        return -weights, -other

    @classmethod
    def attention_flops_per_token(cls, cfg, seq_len: int) -> float:
        # the chunked DPLR path's forward + backward as FlopCounterMode counts it, per head (K = V = head_dim),
        # for one row of seq_len tokens in chunks of C = min(64, T)
        C = min(CHUNK_SIZE, seq_len)
        return cfg.num_heads * sum(dplr_flops_per_token(C, cfg.head_dim, cfg.head_dim, -(-seq_len // C)))

    @classmethod
    def saved_bytes(cls, cfg, backend: str) -> dict:
        """Estimated from the tensors the layer keeps under bf16 autocast: per token the bf16 shifted inputs of
        the six branches and the LoRA activations 2·6·D + 2·Σ ranks, the fp32 w, α, κ̂, b and v mixes 4·6·H·Dh,
        r, k, v, the gate, bonus and group norm 2·8·H·Dh + 8·H; per padded token the delta rule's chunk terms with
        2C rows (the DPLR's augmented chunks) and per held segment its [M | S] map, as `DeltaKind.saved_bytes`."""
        D, H, Dh, C = cfg.hidden_size, cfg.num_heads, cfg.head_dim, CHUNK_SIZE
        own = 12 * D + 2 * sum(lora_ranks(cfg).values()) + 24 * H * Dh + 16 * H * Dh + 8 * H
        return {"token": own, "keys": 0, "segment": 16 * H * Dh * Dh,
                "padded": 2 * (52 * H * Dh + 28 * H * C) + 16 * H + 4 * H / C + 24 * H * Dh * Dh / C}

    @classmethod
    def exchange_payload(cls, cfg, rows: int, act_bytes: float) -> dict:
        # A travels inside the maps; the token shift's halo: one segment's last input, D values per row, of the
        # layer's input, the block's RMSNorm output in the residual stream's dtype (fp32 weights: fp32 under
        # autocast, not an activation of act_bytes)
        return {"decay_bytes": 0, "halo_bytes": rows * cfg.hidden_size * 4}
