"""DeltaNet / Gated DeltaNet layers: against a hand-written reference, packed documents, and HybridLM under SP."""
import pytest
import torch
import torch.nn.functional as F

from lsp.models import HybridConfig, HybridLM, layer_kind
from lsp.ops.delta.naive import naive_delta_recurrence

from .sp_workers import CFG, loss_and_grads, make_batch
from .test_model_sp import assert_same, check_emulated

KINDS = ("deltanet", "gated_deltanet")


def delta_cfg(kind, **kw):
    return HybridConfig(**{**CFG, "linear_attn": kind, "ce_chunk_size": 64, **kw})


def reference_layer(layer, x):
    """The layer written out: conv1d (left zero padding), silu, L2 norm, sigmoid beta, Mamba-2 decay, the delta rule
    step by step, RMSNorm and the output gate. One document per row. x: [B, T, D]."""
    cfg = layer.cfg
    B, T, _ = x.shape
    H, Dh = cfg.num_heads, cfg.head_dim
    k_size = cfg.delta_conv_size
    qkv = F.conv1d(F.pad(layer.qkv_proj(x).transpose(1, 2), (k_size - 1, 0)), layer.conv_weight[:, None, :],
                   groups=3 * H * Dh).transpose(1, 2)
    q, k, v = (t.reshape(B, T, H, Dh) for t in F.silu(qkv).split(H * Dh, dim=-1))
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    beta = torch.sigmoid(layer.b_proj(x))
    g = None
    if cfg.linear_attn == "gated_deltanet":
        g = -torch.exp(layer.A_log) * F.softplus(layer.a_proj(x) + layer.dt_bias)
    o, _ = naive_delta_recurrence(q, k, v, beta, g, Dh ** -0.5, None)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * layer.o_norm.weight
    o = o * F.silu(layer.gate_proj(x)).reshape(B, T, H, Dh)
    return layer.o_proj(o.reshape(B, T, -1))


@pytest.mark.parametrize("kind", KINDS)
def test_layer_matches_reference(kind):
    torch.manual_seed(0)
    layer = layer_kind(kind)(delta_cfg(kind), layer_idx=0).double()
    x = torch.randn(2, 70, CFG["hidden_size"], dtype=torch.float64, requires_grad=True)
    y, ref = layer(x), reference_layer(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(y)
    params = [p for p in layer.parameters()]
    got = torch.autograd.grad((y * w).sum(), [x] + params)
    want = torch.autograd.grad((ref * w).sum(), [x] + params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert (layer(x.flip(1)).flip(1) - y).abs().max() > 1e-3  # negative control: the layer is causal, order matters


@pytest.mark.parametrize("kind", KINDS)
def test_packed_documents_equal_separate_runs(kind):
    torch.manual_seed(0)
    layer = layer_kind(kind)(delta_cfg(kind), layer_idx=0).double()
    x = torch.randn(1, 50, CFG["hidden_size"], dtype=torch.float64)
    cu = [0, 2, 21, 50]  # a document shorter than the conv kernel
    y = layer(x, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    for s, e in zip(cu[:-1], cu[1:]):
        torch.testing.assert_close(y[:, s:e], layer(x[:, s:e]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["allgather", "allscan", "ring"])
@pytest.mark.parametrize("kind", KINDS)
def test_hybrid_lm_sp_equals_single_device(kind, method):
    check_emulated(4, "zigzag", linear_attn=kind, method=method)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_hybrid_lm_sp_packed_documents(layout):
    cu = torch.tensor([0, 13, 40, 64], dtype=torch.int32)  # boundaries inside rank segments
    check_emulated(2, layout, B=1, cu_seqlens=cu, linear_attn="gated_deltanet")


def test_hybrid_lm_sp_with_activation_checkpointing():
    """Recomputing a block in backward re-runs its collectives; every rank does it, so SP stays exact."""
    check_emulated(2, "zigzag", linear_attn="gated_deltanet", activation_checkpointing=True)


def test_negative_control_conv_without_halo_breaks_equivalence(monkeypatch):
    """A conv that ignored the previous segment's tail (zero halo) must be caught by the SP comparison."""
    from lsp.parallel import SPContext
    from lsp.parallel import delta as delta_mod

    torch.manual_seed(0)
    model = HybridLM(delta_cfg("gated_deltanet")).double()
    ids, labels = make_batch(2, 64)
    ref_loss, _ = loss_and_grads(model, ids, labels)
    monkeypatch.setattr(delta_mod.GatherTails, "apply", lambda token, tails, sp: torch.zeros_like(tails))
    sp = SPContext(emulate=2, layout="zigzag")
    loss, _ = loss_and_grads(model, sp.shard(ids, 1), sp.shard(labels, 1), sp=sp)
    assert (loss - ref_loss).abs() > 1e-8


def test_config_rejects_a_bad_conv_size():
    with pytest.raises(ValueError, match="delta_conv_size must be a positive int"):
        delta_cfg("deltanet", delta_conv_size=0)


def test_assert_same_is_not_vacuous():
    torch.manual_seed(0)
    model = HybridLM(delta_cfg("gated_deltanet")).double()
    ids, labels = make_batch(2, 64)
    ref = loss_and_grads(model, ids, labels)
    other = loss_and_grads(model, ids.roll(1, 1), labels)
    with pytest.raises(AssertionError):
        assert_same(*other, *ref)
