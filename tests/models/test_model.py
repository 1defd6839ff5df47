import pytest
import torch
import torch.nn.functional as F

from lsp.models import HybridLM


@pytest.mark.parametrize("kind", ["linear", "lightning", "simple_gla", "gla"])
@pytest.mark.parametrize("pattern", ["L", "S", "LLLS", "LS"])
def test_forward_shapes_and_backward(tiny_cfg, kind, pattern):
    cfg = tiny_cfg(linear_attn=kind, layer_pattern=pattern)
    model = HybridLM(cfg)
    assert "".join(b.kind for b in model.layers) == cfg.layer_types
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    out = model(ids)
    assert out.logits.shape == (2, 64, cfg.vocab_size) and out.loss is None
    out = model(ids, labels=ids)
    assert out.logits is None and out.loss.shape == () and torch.isfinite(out.loss)
    assert abs(out.loss.item() - torch.log(torch.tensor(128.0)).item()) < 0.5  # near-uniform at init
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def per_token_loss(model, ids, labels, **kw):
    logits = model(ids, return_logits=True, labels=labels, **kw).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)


@pytest.mark.parametrize("kind", ["linear", "lightning", "simple_gla", "gla"])
def test_packed_documents_do_not_leak(tiny_cfg, kind):
    model = HybridLM(tiny_cfg(linear_attn=kind, layer_pattern="LS")).double()
    lens = (40, 24)
    docs = [torch.randint(0, 128, (1, n)) for n in lens]
    labels = [torch.cat([d[:, 1:], torch.full((1, 1), -100)], 1) for d in docs]
    separate = torch.cat([per_token_loss(model, d, y) for d, y in zip(docs, labels)])
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    ids, y = torch.cat(docs, 1), torch.cat(labels, 1)
    packed = per_token_loss(model, ids, y, cu_seqlens=cu)
    torch.testing.assert_close(packed, separate, rtol=1e-9, atol=1e-9)
    # negative control: without the boundaries the second document sees the first
    leaky = per_token_loss(model, ids, y)
    torch.testing.assert_close(leaky[: lens[0]], separate[: lens[0]], rtol=1e-9, atol=1e-9)
    assert (leaky[lens[0]:] - separate[lens[0]:]).abs().max() > 1e-6


def test_activation_checkpointing_same_loss_and_grads(tiny_cfg):
    cfg = tiny_cfg(layer_pattern="LS")
    ids = torch.randint(0, 128, (2, 32))
    results = []
    for ckpt in (False, True):
        cfg.activation_checkpointing = ckpt
        torch.manual_seed(1)
        model = HybridLM(cfg).double()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_init_scales_residual_projections(tiny_cfg):
    cfg = tiny_cfg(hidden_size=256, num_heads=4, num_layers=8, initializer_range=0.02)
    model = HybridLM(cfg)
    stds = {n: p.std().item() for n, p in model.named_parameters() if p.dim() == 2}
    residual = 0.02 / (2 * 8) ** 0.5
    for n, s in stds.items():
        want = residual if n.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        assert abs(s - want) < 0.15 * want, (n, s, want)
    assert all((p == 1).all() for n, p in model.named_parameters() if n.endswith("norm.weight"))


def test_tied_embeddings_share_weight(tiny_cfg):
    model = HybridLM(tiny_cfg(tie_embeddings=True))
    assert model.lm_head is None and model.head_weight is model.embed.weight


def test_input_errors(tiny_cfg):
    model = HybridLM(tiny_cfg())
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 7, dtype=torch.long))


def test_bf16_autocast_close_to_fp32(tiny_cfg):
    model = HybridLM(tiny_cfg(layer_pattern="LS"))
    ids = torch.randint(0, 128, (2, 64))
    ref = model(ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and abs(out.loss.item() - ref.item()) < 1e-2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
