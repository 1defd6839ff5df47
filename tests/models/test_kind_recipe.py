"""The recipe "a new linear layer kind" (docs/architecture.md), done from this file alone: `ToyGate` is registered
here, with its own projections, short convolution, feature map, gate, decoding state and planner formulas, on the
existing linear-attention op. No file of lsp/ changes: HybridLM builds it by name, it runs single device and under
emulated SP (equal in fp64), decodes token by token, and the planner prices it (parameters, exchange bytes)."""
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lsp.kinds
from lsp.models import HybridConfig, HybridLM, register_kind
from lsp.models.kinds._decay import DecayKind
from lsp.models.linear_kind import accumulation_dtype, causal_conv

from .kind_checks import check_planner_prices
from .sp_workers import CFG
from .test_generate import TOL, decoded_logits
from .test_model_sp import check_emulated

CONV = 3   # the toy's own short convolution on k


@dataclass
class ToyState:
    """The toy's decoding state: the [B, H, K, V] state and its conv's last CONV - 1 inputs."""
    state: Optional[torch.Tensor] = None
    conv_tail: Optional[torch.Tensor] = None


class ToyGate(DecayKind):
    """k through a short causal conv; q, k = elu + 1; g[b, t, h] = -softplus(w_h · x_t + b_h) · temperature_h."""

    name = "toy_gate"
    state_map = "scalar"

    def __init__(self, cfg, layer_idx):
        super().__init__(cfg, layer_idx)
        H, Dh = cfg.num_heads, cfg.head_dim
        self.k_conv = nn.Parameter(torch.empty(H * Dh, CONV).uniform_(-0.5, 0.5))
        self.toy_gate_proj = nn.Linear(cfg.hidden_size, H, bias=True)
        self.temperature = nn.Parameter(torch.empty(H).uniform_(0.5, 1.5))

    def op_inputs(self, x, *, sp=None, cu_seqlens=None, cache=None):
        # x: [B, T, D] -> q, k, v [B, T, H, Dh], g [B, T, H]
        shape = (*x.shape[:2], self.cfg.num_heads, self.cfg.head_dim)
        k = causal_conv(self.k_proj(x), self.k_conv, sp=sp, cu_seqlens=cu_seqlens, cache=cache).view(shape)
        q, k = F.elu(self.q_proj(x).view(shape)) + 1, F.elu(k) + 1
        return q, k, self.v_proj(x).view(shape), self.decay(x)

    def decay(self, x):
        dtype = accumulation_dtype(x)
        return -F.softplus(self.toy_gate_proj(x).to(dtype)) * self.temperature.to(dtype)

    def new_cache(self):
        return ToyState()

    @classmethod
    def gate_weights(cls, cfg):
        return cfg.hidden_size * cfg.num_heads

    @classmethod
    def gate_parameters(cls, cfg):
        return 2 * cfg.num_heads + cfg.num_heads * cfg.head_dim * CONV     # gate bias, temperature, k conv

    @classmethod
    def exchange_payload(cls, cfg, rows, act_bytes):
        halo = rows * (CONV - 1) * cfg.num_heads * cfg.head_dim * act_bytes    # the k conv's halo
        return {**super().exchange_payload(cfg, rows, act_bytes), "halo_bytes": halo}


@pytest.fixture
def toy():
    register_kind(ToyGate)
    yield ToyGate
    lsp.kinds._REGISTERED.pop(ToyGate.name)     # the built-in kinds registered meanwhile stay


def toy_reference(layer, x, drop_gate=False):
    """The toy layer written out: conv1d (left zero padding), elu + 1, the gated recurrence step by step, RMSNorm,
    output gate. x: [B, T, D], one document per row."""
    cfg = layer.cfg
    B, T, _ = x.shape
    H, Dh = cfg.num_heads, cfg.head_dim
    k = F.conv1d(F.pad(layer.k_proj(x).transpose(1, 2), (CONV - 1, 0)), layer.k_conv[:, None, :], groups=H * Dh)
    q, k = F.elu(layer.q_proj(x).view(B, T, H, Dh)) + 1, F.elu(k.transpose(1, 2).reshape(B, T, H, Dh)) + 1
    v = layer.v_proj(x).view(B, T, H, Dh)
    decay = torch.sigmoid(-layer.toy_gate_proj(x)) ** layer.temperature     # exp(-softplus(a) · t) = sigmoid(-a)^t
    decay = torch.ones_like(decay) if drop_gate else decay
    S, outs = torch.zeros(B, H, Dh, Dh, dtype=x.dtype), []
    for t in range(T):
        S = decay[:, t, :, None, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S) * Dh ** -0.5)
    o = torch.stack(outs, 1)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * layer.o_norm.weight
    return layer.o_proj((o * F.silu(layer.gate_proj(x)).view(B, T, H, Dh)).reshape(B, T, -1))


def test_toy_layer_matches_its_recurrence(toy):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**{**CFG, "linear_attn": "toy_gate"})).double()
    layer = model.layers[0].attn
    assert isinstance(layer, ToyGate)
    x = torch.randn(2, 70, CFG["hidden_size"], dtype=torch.float64)
    torch.testing.assert_close(layer(x), toy_reference(layer, x), rtol=1e-10, atol=1e-12)
    assert (layer(x) - toy_reference(layer, x, drop_gate=True)).abs().max() > 1e-3   # negative control: the gate acts


@pytest.mark.parametrize("W, layout, method", [(2, "zigzag", "allgather"), (4, "contiguous", "allscan"),
                                               (2, "zigzag", "ring")])
def test_toy_kind_sp_equals_single_device(toy, W, layout, method):
    """Loss and every parameter gradient (conv and gate included) under emulated SP equal sp=None, fp64."""
    check_emulated(W, layout, method=method, linear_attn="toy_gate")


@torch.no_grad()
def test_toy_kind_decodes_as_the_full_forward(toy):
    cfg = HybridConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       layer_pattern="LS", linear_attn="toy_gate")
    torch.manual_seed(0)
    model = HybridLM(cfg).double().eval()
    ids = torch.randint(0, 40, (2, 80), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    assert (decoded_logits(model, ids, (37,)) - full).abs().max() < TOL
    # negative control: a decode that loses the conv's tail after the prefill
    cache = model.new_cache()
    model(ids[:, :37], cache=cache)
    cache.layers[0].conv_tail = None
    assert (model(ids[:, 37:38], cache=cache).logits - full[:, 37:38]).abs().max() > 1e-6


def test_planner_prices_the_toy_kind(toy):
    """The kind's parameter formula is exact, and the planner's exchange bytes (states, scalar decays and the conv
    halo) are what one emulated step sends (the check every kind runs: kind_checks.check_planner_prices); a plan
    has fitting candidates."""
    from lsp.plan.planner import Cluster, plan_cluster
    from lsp.run_config import load_config

    cfg = HybridConfig(**{**CFG, "linear_attn": "toy_gate", "layer_pattern": "L", "num_layers": 2})
    check_planner_prices(cfg.num_layers * (CONV - 1) * cfg.num_heads * cfg.head_dim * 4, linear_attn="toy_gate")
    run = load_config(None, ["model.linear_attn=toy_gate"], check_files=False)
    assert any(c.fits for c in plan_cluster(run, Cluster(gpus=8), vocab_size=257))
