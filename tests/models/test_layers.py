"""Each attention layer against a hand-written reference (explicit softmax / step-by-step recurrence)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lsp.models import layer_kind
from lsp.models.layers import SoftmaxAttention, apply_rope


def rope_complex(x, pos, theta):
    # x: [B, T, H, D]; pairs (i, i + D/2) as complex numbers times e^{i p theta^(-2i/D)}
    D = x.shape[-1]
    z = torch.complex(x[..., : D // 2], x[..., D // 2:])
    freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    z = z * torch.polar(torch.ones_like(freq), pos[..., None].double() * freq)[:, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_matches_complex_rotation_and_is_relative():
    x = torch.randn(2, 10, 3, 8, dtype=torch.float64)
    pos = torch.arange(10).expand(2, 10) + 1000
    torch.testing.assert_close(apply_rope(x, pos, 500.0), rope_complex(x, pos, 500.0))
    torch.testing.assert_close(apply_rope(x, pos * 0, 500.0), x)
    q, k = torch.randn(1, 6, 1, 8, dtype=torch.float64), torch.randn(1, 6, 1, 8, dtype=torch.float64)
    p = torch.arange(6)[None]

    def scores(off):
        return torch.einsum("bthd,bshd->ts", apply_rope(q, p + off, 1e4), apply_rope(k, p + off, 1e4))

    torch.testing.assert_close(scores(0), scores(777))          # depends on relative position only
    assert not torch.allclose(scores(0), torch.einsum("bthd,bshd->ts", q, k))  # negative control: it does rotate


def reference_softmax_layer(layer, x, pos):
    cfg = layer.cfg
    B, T, _ = x.shape
    q = layer.q_proj(x).view(B, T, cfg.num_heads, -1)
    k = layer.k_proj(x).view(B, T, cfg.num_kv_heads, -1)
    v = layer.v_proj(x).view(B, T, cfg.num_kv_heads, -1)
    q, k = rope_complex(q, pos, cfg.rope_theta), rope_complex(k, pos, cfg.rope_theta)
    rep = cfg.num_heads // cfg.num_kv_heads
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(cfg.head_dim)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v)
    return layer.o_proj(o.reshape(B, T, -1))


def test_softmax_layer_matches_reference(tiny_cfg):
    layer = SoftmaxAttention(tiny_cfg(rope_theta=300.0)).double()
    x = torch.randn(2, 24, 64, dtype=torch.float64)
    pos = torch.arange(24).expand(2, 24) + 5
    torch.testing.assert_close(layer(x, pos), reference_softmax_layer(layer, x, pos))
    # same relative positions -> same output; negative control: reversed positions differ
    torch.testing.assert_close(layer(x, pos + 100), layer(x, pos))
    assert not torch.allclose(layer(x, pos.flip(1)), layer(x, pos))


def reference_linear_layer(layer, x):
    cfg = layer.cfg
    B, T, _ = x.shape
    H, Dh = cfg.num_heads, cfg.head_dim
    q, k, v = (p(x).view(B, T, H, Dh) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    if cfg.linear_attn == "linear":
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        decay = torch.ones(B, T, H, Dh, dtype=x.dtype)
    elif cfg.linear_attn == "lightning":
        q, k = F.silu(q), F.silu(k)
        decay = layer.log_decay.exp().view(1, 1, H, 1).expand(B, T, H, Dh)
    elif cfg.linear_attn == "simple_gla":
        decay = torch.sigmoid(layer.decay_proj(x)).pow(1 / 16)[..., None].expand(B, T, H, Dh)
    else:
        decay = torch.sigmoid(layer.decay_up(layer.decay_down(x))).pow(1 / 16).view(B, T, H, Dh)
    S = torch.zeros(B, H, Dh, Dh, dtype=x.dtype)
    outs = []
    for t in range(T):
        S = decay[:, t, :, :, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S) * Dh ** -0.5)
    o = torch.stack(outs, 1)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * layer.o_norm.weight
    o = o * F.silu(layer.gate_proj(x)).view(B, T, H, Dh)
    return layer.o_proj(o.reshape(B, T, -1))


@pytest.mark.parametrize("kind", ["linear", "lightning", "simple_gla", "gla"])
def test_linear_layer_matches_recurrence(tiny_cfg, kind):
    layer = layer_kind(kind)(tiny_cfg(linear_attn=kind), layer_idx=1).double()
    torch.nn.init.normal_(layer.o_norm.weight, 1.0, 0.1)
    x = torch.randn(2, 20, 64, dtype=torch.float64)
    out = layer(x)
    torch.testing.assert_close(out, reference_linear_layer(layer, x))
    # negative control: the output is causal but not position-wise (the state carries earlier tokens)
    x2 = x.clone()
    x2[:, 3] += 1.0
    diff = (layer(x2) - out).abs().amax(dim=(0, 2))
    assert diff[:3].max() == 0 and diff[4:].min() > 1e-6


def test_lightning_decay_is_fixed_alibi_slopes(tiny_cfg):
    layer = layer_kind("lightning")(tiny_cfg(linear_attn="lightning", num_layers=3), layer_idx=0)
    # H = 4: ALiBi slopes 2^-2, 2^-4, 2^-6, 2^-8 at the first layer (depth factor 1 + 1e-5)
    torch.testing.assert_close(layer.log_decay, -torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]) * (1 + 1e-5))
    assert not any(n == "log_decay" for n, _ in layer.named_parameters())
