"""The `mamba2` kind: the layer against Mamba-2's SSD recurrence written out step by step (fp64), emulated SP equal
to one device (loss and every gradient, conv halo included), packed documents, decoding, planner, bad input."""
import pytest
import torch
import torch.nn.functional as F

from lsp.hybrid_config import HybridConfig, HybridConfigError
from lsp.models import HybridLM

from .kind_checks import check_decodes_as_full_forward, check_planner_prices, check_sp_needs_the_conv_halo
from .sp_workers import CFG
from .test_model_sp import check_emulated

SSM = dict(linear_attn="mamba2", ssm_state_size=12, ssm_groups=2)   # N != head_dim, two groups of heads


def mamba2_reference(layer, x, skip=True, group_of=lambda h, H, G: h // (H // G)):
    """Mamba-2 by its equations: in_proj, conv1d (left zero padding, bias), silu, dt = softplus(dt + dt_bias),
    h_t = exp(dt A) h_{t-1} + dt B_t x_tᵀ per head, y_t = C_t h_t + D x_t, RMSNorm(y · silu(z)) per group, out_proj.
    x: [B, T, D], one document per row. `skip` and `group_of` exist for the negative controls."""
    cfg = layer.cfg
    Bsz, T, _ = x.shape
    H, P, N, G, k = cfg.num_heads, cfg.head_dim, cfg.ssm_state_size, cfg.ssm_groups, cfg.delta_conv_size
    inner = H * P
    z, xBC, dt = layer.in_proj(x).split([inner, inner + 2 * G * N, H], dim=-1)
    xBC = F.conv1d(F.pad(xBC.transpose(1, 2), (k - 1, 0)), layer.conv_weight[:, None, :], layer.conv_bias,
                   groups=xBC.shape[-1])
    xs, Bm, Cm = F.silu(xBC.transpose(1, 2)).split([inner, G * N, G * N], dim=-1)
    xs, Bm, Cm = xs.view(Bsz, T, H, P), Bm.view(Bsz, T, G, N), Cm.view(Bsz, T, G, N)
    dt = F.softplus(dt + layer.dt_bias)
    A = -layer.A_log.exp()
    groups = [group_of(h, H, G) for h in range(H)]
    state, ys = torch.zeros(Bsz, H, N, P, dtype=x.dtype), []
    for t in range(T):
        Bt, Ct = Bm[:, t, groups], Cm[:, t, groups]                                       # [B, H, N]
        write = Bt[..., None] * (dt[:, t, :, None] * xs[:, t])[:, :, None]                  # [B, H, N, P]
        state = (dt[:, t] * A).exp()[..., None, None] * state + write
        ys.append(torch.einsum("bhn,bhnp->bhp", Ct, state) + skip * layer.D[:, None] * xs[:, t])
    y = (torch.stack(ys, 1).reshape(Bsz, T, G, -1) * F.silu(z).view(Bsz, T, G, -1))
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    return layer.out_proj(y.reshape(Bsz, T, inner) * layer.norm_weight)


def mamba2_layer():
    torch.manual_seed(0)
    layer = HybridLM(HybridConfig(**{**CFG, **SSM})).double().layers[0].attn
    with torch.no_grad():                     # larger dt than the init's [1e-3, 0.1], so that the decay acts
        layer.dt_bias.add_(2.0)
    return layer


def test_layer_matches_the_ssd_recurrence():
    layer = mamba2_layer()
    x = torch.randn(2, 70, CFG["hidden_size"], dtype=torch.float64)
    ref = mamba2_reference(layer, x)
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-12)
    # negative controls: the D skip and the head -> group map of B and C each change the output
    assert (layer(x) - mamba2_reference(layer, x, skip=False)).abs().max() > 1e-3
    assert (layer(x) - mamba2_reference(layer, x, group_of=lambda h, H, G: h % G)).abs().max() > 1e-3


def test_packed_documents_equal_separate_rows():
    """The conv and the state restart at each document start (cu_seqlens)."""
    layer = mamba2_layer()
    x = torch.randn(1, 50, CFG["hidden_size"], dtype=torch.float64)
    cu = torch.tensor([0, 17, 50], dtype=torch.int32)
    packed = layer(x, cu_seqlens=cu)
    separate = torch.cat([mamba2_reference(layer, x[:, :17]), mamba2_reference(layer, x[:, 17:])], dim=1)
    torch.testing.assert_close(packed, separate, rtol=1e-10, atol=1e-12)
    assert (layer(x) - separate).abs().max() > 1e-3          # control: without cu_seqlens the documents mix


@pytest.mark.parametrize("W, layout, method", [(2, "zigzag", "allgather"), (4, "contiguous", "allscan"),
                                               (4, "zigzag", "ring")])
def test_sp_equals_single_device(W, layout, method):
    check_emulated(W, layout, method=method, **SSM)


def test_negative_control_sp_without_the_conv_halo_is_caught(monkeypatch):
    """Each rank convolving its own segment alone (zeros before it instead of the previous segment's inputs)
    must fail the SP comparison above."""
    check_sp_needs_the_conv_halo(monkeypatch, **SSM)


def test_sp_packed_documents():
    check_emulated(2, "zigzag", B=1, cu_seqlens=torch.tensor([0, 13, 40, 64], dtype=torch.int32), **SSM)


def test_decodes_as_the_full_forward():
    model, ids, full = check_decodes_as_full_forward(**SSM)
    with torch.no_grad():                     # negative control: a decode that loses the conv's tail
        cache = model.new_cache()
        model(ids[:, :37], cache=cache)
        cache.layers[0].conv_tail = None
        assert (model(ids[:, 37:38], cache=cache).logits - full[:, 37:38]).abs().max() > 1e-6


def test_planner_prices_mamba2():
    H, Dh, N, G = CFG["num_heads"], CFG["hidden_size"] // CFG["num_heads"], SSM["ssm_state_size"], SSM["ssm_groups"]
    check_planner_prices(2 * (4 - 1) * (H * Dh + 2 * G * N) * 4, **SSM)        # two mamba2 layers


def test_groups_that_do_not_divide_the_heads_are_one_line():
    with pytest.raises(HybridConfigError, match=r"^ssm_groups: 3 does not divide num_heads=4$"):
        HybridConfig(**{**CFG, **SSM, "ssm_groups": 3})


def test_bf16_autocast_trains_and_follows_fp32():
    torch.manual_seed(0)
    layer = HybridLM(HybridConfig(**{**CFG, **SSM})).layers[0].attn
    x = torch.randn(2, 40, CFG["hidden_size"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and layer.A_log.grad is not None
    torch.testing.assert_close(out.float(), layer(x), rtol=0.05, atol=0.05)
