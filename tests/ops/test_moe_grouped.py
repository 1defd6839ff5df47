"""`expert_ffn`'s grouped GEMM (torch._grouped_mm, CUDA bf16) equals its per-expert loop, outputs and gradients.
Needs a GPU (marked `gpu`); on CPU the loop is the only path (its backward through _grouped_mm fails there)."""
import pytest
import torch

from lsp.ops import moe as moe_ops

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
def test_grouped_gemm_equals_loop(monkeypatch):
    torch.manual_seed(0)
    E, D, I = 8, 256, 128
    counts = [5, 0, 17, 3, 64, 1, 0, 30]       # an empty expert and uneven groups
    x = torch.randn(sum(counts), D, device="cuda", dtype=torch.bfloat16)
    weights = [torch.randn(E, D, I, device="cuda", dtype=torch.bfloat16) * 0.05,
               torch.randn(E, D, I, device="cuda", dtype=torch.bfloat16) * 0.05,
               torch.randn(E, I, D, device="cuda", dtype=torch.bfloat16) * 0.05]
    assert moe_ops.grouped_mm_available(x)
    results = []
    for grouped in (True, False):
        xs = x.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in weights]
        if not grouped:   # the loop: what runs where no grouped GEMM is available
            monkeypatch.setattr(moe_ops, "grouped_mm_available", lambda t: False)
        y = moe_ops.expert_ffn(xs, counts, *ws)
        y.float().square().sum().backward()
        results.append([y.float(), xs.grad.float()] + [w.grad.float() for w in ws])
    for a, b in zip(*results):   # bf16 products, fp32 accumulation in both: agree to a few bf16 ulps
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
