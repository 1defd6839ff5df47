"""The `hgrn2` kind: the layer against HGRN2's recurrence written out step by step (fp64), the forget gates'
lower bound rising with depth, emulated SP equal to one device, packed documents, decoding, planner."""
import pytest
import torch
import torch.nn.functional as F

from lsp.models import HybridConfig, HybridLM
from lsp.models.kinds.hgrn2 import forget_lower_bound

from .kind_checks import check_decodes_as_full_forward, check_planner_prices
from .sp_workers import CFG
from .test_model_sp import check_emulated


def hgrn2_reference(layer, x, lower_bound):
    """HGRN2 by its equations: q = silu(W_q x), f = lb + (1 - lb) sigmoid(W_f x), i = W_i x,
    S_t = Diag(f_t) S_{t-1} + (1 - f_t) i_tᵀ per head, o_t = q_t S_t / sqrt(K), o_proj(RMSNorm(o)).
    x: [B, T, D], one document per row."""
    cfg = layer.cfg
    B, T, _ = x.shape
    H, K = cfg.num_heads, cfg.head_dim
    q = F.silu(layer.q_proj(x)).view(B, T, H, K)
    f = lower_bound + (1 - lower_bound) * torch.sigmoid(layer.f_proj(x)).view(B, T, H, K)
    i = layer.i_proj(x).view(B, T, H, K)
    S, outs = torch.zeros(B, H, K, K, dtype=x.dtype), []
    for t in range(T):
        S = f[:, t, :, :, None] * S + (1 - f[:, t, :, :, None]) * i[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S) * K ** -0.5)
    o = torch.stack(outs, 1).reshape(B, T, H * K)
    return layer.o_proj(o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * layer.g_norm.weight)


def test_lower_bounds_rise_with_depth_from_zero():
    assert [forget_lower_bound(l, 4) for l in range(4)] == [0, 0.25, 0.5, 0.75]


@pytest.mark.parametrize("layer_idx", [0, 2])
def test_layer_matches_the_hgrn2_recurrence(layer_idx):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**{**CFG, "linear_attn": "hgrn2"})).double()
    layer = model.layers[layer_idx].attn                   # CFG's pattern LSL: layers 0 and 2 are hgrn2
    lb = layer_idx / CFG["num_layers"]
    x = torch.randn(2, 70, CFG["hidden_size"], dtype=torch.float64)
    torch.testing.assert_close(layer(x), hgrn2_reference(layer, x, lb), rtol=1e-10, atol=1e-12)
    # negative control: the other layer's lower bound (none at depth 2, 2/3 at depth 0) changes the output
    assert (layer(x) - hgrn2_reference(layer, x, 2 / 3 - lb)).abs().max() > 1e-3


def test_packed_documents_equal_separate_rows():
    torch.manual_seed(0)
    layer = HybridLM(HybridConfig(**{**CFG, "linear_attn": "hgrn2"})).double().layers[2].attn
    x = torch.randn(1, 50, CFG["hidden_size"], dtype=torch.float64)
    cu = torch.tensor([0, 17, 50], dtype=torch.int32)
    separate = torch.cat([hgrn2_reference(layer, x[:, :17], 2 / 3), hgrn2_reference(layer, x[:, 17:], 2 / 3)], 1)
    torch.testing.assert_close(layer(x, cu_seqlens=cu), separate, rtol=1e-10, atol=1e-12)
    assert (layer(x) - separate).abs().max() > 1e-3          # control: without cu_seqlens the documents mix


@pytest.mark.parametrize("W, layout, method", [(2, "zigzag", "allgather"), (4, "contiguous", "allscan"),
                                               (4, "zigzag", "ring")])
def test_sp_equals_single_device(W, layout, method):
    check_emulated(W, layout, method=method, linear_attn="hgrn2")


def test_sp_packed_documents():
    check_emulated(2, "zigzag", B=1, cu_seqlens=torch.tensor([0, 13, 40, 64], dtype=torch.int32),
                   linear_attn="hgrn2")


def test_decodes_as_the_full_forward():
    model, ids, full = check_decodes_as_full_forward(linear_attn="hgrn2")
    with torch.no_grad():                     # negative control: a decode that drops the state after the prefill
        cache = model.new_cache()
        model(ids[:, :37], cache=cache)
        cache.layers[0].state = None
        assert (model(ids[:, 37:38], cache=cache).logits - full[:, 37:38]).abs().max() > 1e-6


def test_planner_prices_hgrn2():
    check_planner_prices(0, linear_attn="hgrn2")


def test_bf16_autocast_trains_and_follows_fp32():
    """Under bf16 autocast q, k, v reach the op in one dtype (k = 1 - f once came out fp32 beside bf16 q, v and the
    op refused the mix); the output follows the fp32 layer to bf16 precision."""
    torch.manual_seed(0)
    layer = HybridLM(HybridConfig(**{**CFG, "linear_attn": "hgrn2"})).layers[2].attn
    x = torch.randn(2, 40, CFG["hidden_size"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and layer.f_proj.weight.grad is not None
    torch.testing.assert_close(out.float(), layer(x), rtol=0.05, atol=0.05)
