"""Checks every built-in layer kind's test runs on its HybridLM (the recipe's steps, docs/architecture.md): decoding
token by token equals the full forward, the planner prices the kind (parameters exact, SP exchange bytes equal
what an emulated step sends), and a kind with a short convolution needs its SP halo."""
import pytest
import torch

from lsp.models import HybridConfig, HybridLM, num_parameters
from lsp.parallel import SPContext, comm_stats, reset_comm_stats
from lsp.plan.costmodel import Hardware
from lsp.plan.planner import linear_exchange, model_parameters

from .sp_workers import CFG
from .test_generate import TOL, decoded_logits
from .test_model_sp import check_emulated


@torch.no_grad()
def check_decodes_as_full_forward(**overrides):
    """A prefill of 37 tokens then one token at a time equals the full forward (fp64); returns the model, ids and
    full logits for a kind's own negative control."""
    cfg = HybridConfig(**{**dict(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 layer_pattern="LS"), **overrides})
    torch.manual_seed(0)
    model = HybridLM(cfg).double().eval()
    ids = torch.randint(0, 40, (2, 80), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    assert (decoded_logits(model, ids, (37,)) - full).abs().max() < TOL
    return model, ids, full


def check_planner_prices(halo_per_row_token: float, **overrides):
    """model_parameters equals the built model's count; the planner's exchange bytes per pass of every linear
    layer (states, total decays, conv halo: halo_per_row_token bytes per row and halo token summed over the layers)
    equal what one emulated step sends."""
    cfg = HybridConfig(**{**CFG, "layer_pattern": "L", "num_layers": 2, **overrides})
    torch.manual_seed(0)
    model = HybridLM(cfg)
    assert model_parameters(cfg) == num_parameters(model)
    B, T, W = 2, 48, 2
    for layout in ("zigzag", "contiguous"):
        sp = SPContext(emulate=W, layout=layout, method="allgather")
        ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(0))
        reset_comm_stats()
        model(sp.shard(ids, 1), labels=sp.shard(ids, 1), sp=sp).loss.backward()
        sent = sum(v["bytes_recv"] for k, v in comm_stats()["by_tag_op"].items()
                   if not k.startswith("all_reduce_sum")) / W
        per_pass = sum(n * linear_exchange(cfg, Hardware(act_bytes=4), W, "allgather", B, 0.0, layout, kind=kind)[1]
                       for kind, n in cfg.linear_kind_counts().items())      # summed over the layers' kinds
        assert sent == pytest.approx(2 * per_pass, rel=1e-12), (layout, sent, per_pass)
        if halo_per_row_token:                                          # control: the halo is counted
            halo = (W - 1) * (2 if layout == "zigzag" else 1) * B * halo_per_row_token
            assert sent != pytest.approx(2 * (per_pass - halo), rel=1e-3)


def check_sp_needs_the_conv_halo(monkeypatch, **overrides):
    """Negative control of a kind's SP test: each rank convolving (or token-shifting) its own segment alone, zeros
    before it instead of the previous segment's last inputs, must fail the emulated SP comparison."""
    import lsp.models.linear_kind as linear_kind
    from lsp.ops.delta import short_conv

    monkeypatch.setattr(linear_kind, "sp_short_conv", lambda x, weight, sp, cu_seqlens: short_conv(x, weight))
    with pytest.raises(AssertionError):
        check_emulated(2, "contiguous", **overrides)
