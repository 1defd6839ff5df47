"""The `kda` kind (Kimi Delta Attention): the layer against a step-by-step fp64 recurrence written here, HybridLM
under emulated SP equal to one device, decoding equal to the full forward, the planner's parameter count, and the
grouped value heads (num_v_heads = G·num_heads) through all of them. Each has a negative control.

Tolerances: fp64 throughout; the chunked WY/UT path and the loop below differ by summation order only (~1e-15
relative on outputs of size ~1), so 1e-10 / 1e-12 as in test_delta_layers.py; decoding's 1e-10 is test_generate's.
"""
import pytest
import torch
import torch.nn.functional as F

from lsp.hybrid_config import HybridConfigError
from lsp.models import HybridConfig, HybridLM, layer_kind, num_parameters
from lsp.models.kinds.kda import KimiDeltaAttention

from .sp_workers import CFG
from .test_generate import TOL, decoded_logits
from .test_model_sp import check_emulated


def kda_cfg(**kw):
    return HybridConfig(**{**CFG, "linear_attn": "kda", "ce_chunk_size": 64, **kw})


def reference_kda(layer, x, per_head_gate=False):
    """KDA written out, one document per row: conv1d with left zero padding and silu on q, k, v; L2-normalised q,
    k; beta = sigmoid(b_proj x); g = -exp(A_log)·softplus(f_up f_down x + dt_bias) per key channel; then per token
    S = Diag(exp g) S,  S = S + beta k (v - Sᵀk)ᵀ,  o = q S / sqrt(K); RMSNorm · sigmoid(g_up g_down x); o_proj.
    Value head j reads q/k head j // G. per_head_gate: the gate averaged over key channels (negative control)."""
    cfg = layer.cfg
    B, T, _ = x.shape
    H, HV, K = cfg.num_heads, cfg.num_v_heads, cfg.head_dim
    G, width = HV // H, cfg.delta_conv_size
    qkv = F.conv1d(F.pad(layer.qkv_proj(x).transpose(1, 2), (width - 1, 0)), layer.conv_weight[:, None, :],
                   groups=(2 * H + HV) * K).transpose(1, 2)
    q, k, v = F.silu(qkv).split((H * K, H * K, HV * K), dim=-1)
    q, k = (t.reshape(B, T, H, K) for t in (q, k))
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    v = v.reshape(B, T, HV, K)
    beta = torch.sigmoid(layer.b_proj(x))
    f = (layer.f_up(layer.f_down(x)) + layer.dt_bias).reshape(B, T, HV, K)
    g = -torch.exp(layer.A_log)[:, None] * F.softplus(f)
    if per_head_gate:
        g = g.mean(-1, keepdim=True).expand_as(g)
    S, outs = x.new_zeros(B, HV, K, K), []
    for t in range(T):
        qt, kt = q[:, t].repeat_interleave(G, 1), k[:, t].repeat_interleave(G, 1)        # [B, HV, K]
        S = g[:, t].exp()[..., None] * S
        err = v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + beta[:, t, :, None, None] * kt[..., None] * err[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qt, S) * K ** -0.5)
    o = torch.stack(outs, 1)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * layer.o_norm.weight
    o = o * torch.sigmoid(layer.g_up(layer.g_down(x))).reshape(B, T, HV, K)
    return layer.o_proj(o.reshape(B, T, -1))


@pytest.mark.parametrize("num_v_heads", [None, 8])
def test_kda_layer_matches_its_recurrence(num_v_heads):
    """Output and the gradients of x and every parameter (A_log, dt_bias, both low-rank gates, conv) in fp64."""
    torch.manual_seed(0)
    layer = layer_kind("kda")(kda_cfg(num_v_heads=num_v_heads), layer_idx=0).double()
    assert isinstance(layer, KimiDeltaAttention)
    with torch.no_grad():   # away from the init's zeros so that every term (dt_bias, g_up's bias) is exercised
        layer.dt_bias.normal_(0.0, 1.0)
        layer.g_up.bias.normal_(0.0, 1.0)
    x = torch.randn(2, 70, CFG["hidden_size"], dtype=torch.float64, requires_grad=True)
    y, ref = layer(x), reference_kda(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(y)
    params = list(layer.parameters())
    got = torch.autograd.grad((y * w).sum(), [x] + params)
    want = torch.autograd.grad((ref * w).sum(), [x] + params)
    for (name, _), a, b in zip([("x", None)] + list(layer.named_parameters()), got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    # negative control: one decay per head instead of one per key channel moves the output
    assert (y - reference_kda(layer, x, per_head_gate=True)).abs().max() > 1e-3


def test_kda_packed_documents_equal_separate_runs():
    torch.manual_seed(0)
    layer = layer_kind("kda")(kda_cfg(num_v_heads=8), layer_idx=0).double()
    x = torch.randn(1, 50, CFG["hidden_size"], dtype=torch.float64)
    cu = [0, 2, 21, 50]  # a document shorter than the conv kernel
    y = layer(x, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    for s, e in zip(cu[:-1], cu[1:]):
        torch.testing.assert_close(y[:, s:e], layer(x[:, s:e]), rtol=1e-10, atol=1e-12)
    assert (y[:, 21:] - layer(x)[:, 21:]).abs().max() > 1e-6    # control: the boundary resets state and conv


@pytest.mark.parametrize("W, layout, method, num_v_heads", [(2, "zigzag", "allgather", None),
                                                            (4, "contiguous", "allscan", None),
                                                            (4, "zigzag", "ring", 8),
                                                            (2, "contiguous", "allgather", 8)])
def test_kda_sp_equals_single_device(W, layout, method, num_v_heads):
    """Loss and every parameter gradient under emulated SP equal sp=None in fp64 (check_emulated's assert_same,
    whose negative control is test_delta_layers.py::test_assert_same_is_not_vacuous)."""
    check_emulated(W, layout, method=method, linear_attn="kda", num_v_heads=num_v_heads)


def test_kda_sp_packed_documents():
    cu = torch.tensor([0, 13, 40, 64], dtype=torch.int32)  # boundaries inside rank segments
    check_emulated(2, "zigzag", B=1, cu_seqlens=cu, linear_attn="kda")


def kda_lm(num_v_heads=None, pattern="LSL"):
    cfg = HybridConfig(vocab_size=40, hidden_size=32, num_layers=len(pattern), num_heads=4, num_kv_heads=2,
                       num_v_heads=num_v_heads, layer_pattern=pattern, linear_attn="kda")
    torch.manual_seed(0)
    return HybridLM(cfg).double().eval()


@torch.no_grad()
@pytest.mark.parametrize("num_v_heads", [None, 8])
@pytest.mark.parametrize("splits", [(64,), (37,), (1,), (37, 77)])
def test_kda_decoding_equals_full_forward(num_v_heads, splits):
    model = kda_lm(num_v_heads)
    ids = torch.randint(0, 40, (2, 80), generator=torch.Generator().manual_seed(1))
    assert (decoded_logits(model, ids, splits) - model(ids).logits).abs().max() < TOL


@torch.no_grad()
def test_kda_negative_control_decode_step_with_a_per_head_gate(monkeypatch):
    """A one-token step that collapses the per-key gate to one decay per head is caught."""
    import lsp.models.cache as cache_mod

    model = kda_lm(8, pattern="LS")
    ids = torch.randint(0, 40, (2, 80), generator=torch.Generator().manual_seed(1))
    step = cache_mod.delta_step
    monkeypatch.setattr(cache_mod, "delta_step", lambda q, k, v, beta, g, scale, S:
                        step(q, k, v, beta, g.mean(-1), scale, S))
    assert (decoded_logits(model, ids, (37,)) - model(ids).logits).abs().max() > 1e-6


def test_kda_parameter_formula_is_exact():
    from lsp.plan.planner import model_parameters

    for num_v_heads in (None, 8):
        cfg = kda_cfg(num_v_heads=num_v_heads)
        assert model_parameters(cfg) == num_parameters(HybridLM(cfg))
    for kind in ("deltanet", "gated_deltanet"):           # the grouped heads of the shared delta base
        cfg = kda_cfg(linear_attn=kind, num_v_heads=8)
        assert model_parameters(cfg) == num_parameters(HybridLM(cfg))


def test_grouped_value_heads_bad_input():
    with pytest.raises(HybridConfigError, match="num_v_heads must be a positive multiple of num_heads=4"):
        kda_cfg(num_v_heads=6)
    with pytest.raises(HybridConfigError, match="num_v_heads: 8 != num_heads=4: linear kind 'gla'"):
        HybridLM(kda_cfg(linear_attn="gla", num_v_heads=8))


@torch.no_grad()
def test_kda_export_round_trip_keeps_num_v_heads_and_logits(tmp_path):
    """`lsp export` then `import_hf` of a KDA hybrid with grouped value heads: the same config (num_v_heads
    included), every weight bitwise and the same logits (the kind has no derived buffer: `reset_buffers` is the
    base's no-op). Control: one changed gate parameter changes the logits."""
    from lsp.export import export_model, import_hf
    from lsp.train.tokenizer import IdTokenizer

    model = kda_lm(8, pattern="LLS").float()
    export_model(model, IdTokenizer(model.cfg.vocab_size), tmp_path)
    back = import_hf(str(tmp_path)).eval()
    assert back.cfg == model.cfg and back.cfg.num_v_heads == 8
    ids = torch.randint(0, 40, (2, 70), generator=torch.Generator().manual_seed(1))
    assert torch.equal(back(ids).logits, model(ids).logits)
    back.layers[0].attn.A_log[0] += 1e-2
    assert not torch.equal(back(ids).logits, model(ids).logits)
