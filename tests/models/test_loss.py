import pytest
import torch
import torch.nn.functional as F

from lsp.models import HybridLM, chunked_cross_entropy


@pytest.mark.parametrize("chunk_size", [7, 32, 1000])
def test_chunked_ce_matches_full_logits(chunk_size):
    N, D, V = 50, 12, 37
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[::5] = -100
    loss_sum, count = chunked_cross_entropy(h, w, y, chunk_size=chunk_size)
    (loss_sum * 0.7).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum")
    (ref * 0.7).backward()
    assert count.item() == (y != -100).sum().item() == 40
    torch.testing.assert_close(loss_sum, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, w.grad, rtol=1e-10, atol=1e-12)
    # negative control: counting the ignored tokens changes the loss, so the ignore path is exercised
    assert not torch.allclose(ref, F.cross_entropy(h @ w.t(), y.clamp(min=0), reduction="sum"))


def test_no_grad_and_shape_error():
    h, w = torch.randn(2, 5, 8), torch.randn(11, 8)
    with torch.no_grad():
        s, c = chunked_cross_entropy(h, w, torch.randint(0, 11, (2, 5)), chunk_size=3)
    assert c.item() == 10 and torch.isfinite(s)
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(h, w, torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_equals_plain_cross_entropy(tiny_cfg, tie):
    cfg = tiny_cfg(layer_pattern="LS", num_layers=2, tie_embeddings=tie, ce_chunk_size=13)
    model = HybridLM(cfg).double()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :7] = -100
    out = model(ids, labels=labels, return_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    assert out.num_tokens.item() == (labels != -100).sum().item()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)
    assert model(ids, labels=labels).logits is None
