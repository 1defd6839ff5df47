"""softmax_attention against an explicit fp64 softmax(QKᵀ) V reference."""
from __future__ import annotations

import pytest
import torch

from lsp.ops import softmax_attention

from .linear_cases import max_rel_err


def reference(q, k, v, causal, cu_seqlens=None):
    # q: [B, T, H, D]; k, v: [B, T, Hkv, D]
    B, T, H, D = q.shape
    rep = H // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * D**-0.5
    allowed = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    if cu_seqlens is not None:
        doc = torch.zeros(T, dtype=torch.long)
        for s in cu_seqlens.tolist()[1:-1]:
            doc[s:] += 1
        allowed &= doc[:, None] == doc[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_matches_reference(causal, H, Hkv):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 33, H, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 33, Hkv, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    o = softmax_attention(q, k, v, causal=causal)
    ref = reference(q, k, v, causal)
    assert max_rel_err(o, ref) < 1e-12
    w = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((o * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert max_rel_err(a, b) < 1e-12


def test_document_masking():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 40, 2, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 40, 1, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0, 13, 14, 40], dtype=torch.int32)
    o = softmax_attention(q, k, v, cu_seqlens=cu)
    assert max_rel_err(o, reference(q, k, v, True, cu)) < 1e-12
    # negative control: without the document mask the second document sees the first one
    assert max_rel_err(softmax_attention(q, k, v), reference(q, k, v, True, cu)) > 1e-2
