"""softmax_attention against an explicit fp64 softmax(QKᵀ) V reference."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lsp.ops import softmax_attention
from lsp.ops.softmax import (
    PieceRun,
    causal_suffix_attention,
    document_mask,
    lower_right_sdpa,
    piece_runs,
    piecewise_attention,
    sdpa,
)

from .linear_cases import max_rel_err


def attend(q, k, v, allowed):
    # q: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D]; allowed: [Tq, Tk] bool -> explicit softmax(QKᵀ) V
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[3] ** -0.5
    return torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def reference(q, k, v, causal, cu_seqlens=None):
    # q: [B, T, H, D]; k, v: [B, T, Hkv, D]
    T = q.shape[1]
    allowed = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    if cu_seqlens is not None:
        doc = torch.zeros(T, dtype=torch.long)
        for s in cu_seqlens.tolist()[1:-1]:
            doc[s:] += 1
        allowed &= doc[:, None] == doc[None, :]
    return attend(q, k, v, allowed)


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


def test_piece_runs_batch_equal_adjacent_pieces():
    blocks = {3: [(0, 4, 2)]}
    assert piece_runs([0, 2, 4, 6, 9, 10, 11]) == [PieceRun(0, 2, 3), PieceRun(6, 3), PieceRun(9, 1, 2)]
    assert piece_runs([0, 2, 4, 6, 8], blocks) == [PieceRun(0, 2, 3), PieceRun(6, 2, 1, ((0, 4, 2),))]
    assert piece_runs([0, 2, 4], batched=False) == [PieceRun(0, 2), PieceRun(2, 2)]


def _piecewise_case(H, Hkv, dtype=torch.float64, T=30, S=12, seed=4):
    # local q, k, v [1, T, *] and one K|V source [1, S, 1, 2, Hkv, D]
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)  # noqa
    return rnd(1, T, H, 8), rnd(1, T, Hkv, 8), rnd(1, T, Hkv, 8), rnd(1, S, 1, 2, Hkv, 8)


# pieces: a run of four 3-token documents, then pieces that also see blocks of the source
RUNS = [PieceRun(0, 3, 4), PieceRun(12, 7, 1, ((0, 0, 5),)), PieceRun(19, 5),
        PieceRun(24, 6, 1, ((0, 5, 7), (0, 1, 2)))]


def piecewise_reference(q, k, v, src, runs, causal):
    """Explicit attention over [source keys; own keys] with the allowed pairs spelled out per piece."""
    S, T = src.shape[1], q.shape[1]
    allowed = torch.zeros(T, S + T, dtype=torch.bool)
    for run in runs:
        for p in range(run.count):
            a = run.start + p * run.length
            own = torch.ones(run.length, run.length, dtype=torch.bool)
            allowed[a : a + run.length, S + a : S + a + run.length] = own.tril() if causal else own
            for _, first, length in run.blocks:
                allowed[a : a + run.length, first : first + length] = True
    keys, values = (torch.cat([src[0, :, :, i].transpose(0, 1), x], dim=1) for i, x in ((0, k), (1, v)))
    return attend(q, keys, values, allowed)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_piecewise_matches_reference(causal, H, Hkv):
    """Batched equal-length pieces and pieces with extra key blocks (overlapping ones included), fp64: outputs and
    the gradients of q, k, v and the shared source; negative control: one block a token short must fail."""
    q, k, v, src = _piecewise_case(H, Hkv)
    o = piecewise_attention(q, k, v, RUNS, kv_sources=src, causal=causal)
    ref = piecewise_reference(q, k, v, src, RUNS, causal)
    assert max_rel_err(o, ref) < 1e-12
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got, want = (torch.autograd.grad((x * w).sum(), (q, k, v, src)) for x in (o, ref))
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < 1e-12
    short = RUNS[:1] + [PieceRun(12, 7, 1, ((0, 1, 4),))] + RUNS[2:]
    assert max_rel_err(piecewise_attention(q, k, v, short, kv_sources=src, causal=causal), ref) > 1e-3


def test_piecewise_low_precision():
    q, k, v, src = _piecewise_case(4, 2, dtype=torch.bfloat16)
    o = piecewise_attention(q, k, v, RUNS, kv_sources=src)
    ref = piecewise_reference(*(x.detach().double() for x in (q, k, v, src)), RUNS, True)
    assert o.dtype == torch.bfloat16 and max_rel_err(o, ref) < 2e-2


class LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an aten op returns while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def test_packed_single_device_forms_no_T_by_T_tensor():
    """softmax_attention with cu_seqlens runs per document: no [T, T] mask in forward or backward (control: the
    document mask is T·T)."""
    T, gen = 256, torch.Generator().manual_seed(7)
    q = torch.randn(1, T, 4, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, T, 2, 8, generator=gen, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, 32, 64, 96, 128, 200, 256], dtype=torch.int32)
    with LargestTensor() as rec:
        softmax_attention(q, k, v, cu_seqlens=cu).sum().backward()
    assert rec.numel == q.numel() < T * T                          # the largest tensors are q-sized
    with LargestTensor() as control:
        document_mask(cu, T, True, q.device)
    assert control.numel == T * T


def suffix_reference(q, k, v):
    """Explicit fp64 attention of the last Tq of Tk positions: query i sees keys 0 .. Tk - Tq + i."""
    Tq, Tk = q.shape[1], k.shape[1]
    return attend(q, k, v, torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq))


def _suffix_inputs(Tq, Tk, H, Hkv, dtype=torch.float64, seed=2):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, Tq, H, 8, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    k, v = (torch.randn(2, Tk, Hkv, 8, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
            for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("Tq,Tk", [(16, 16), (16, 48), (1, 33), (20, 21)])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)])
def test_causal_suffix_matches_reference(Tq, Tk, H, Hkv):
    """The mask-free path SP softmax layers use (prefix block + causal diagonal block, merged by log-sum-exp):
    outputs and gradients equal the explicit reference in fp64; a top-left-aligned causal mask (what plain
    is_causal=True would apply) must fail."""
    q, k, v = _suffix_inputs(Tq, Tk, H, Hkv)
    o, ref = causal_suffix_attention(q, k, v), suffix_reference(q, k, v)
    assert max_rel_err(o, ref) < 1e-12
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((o * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert max_rel_err(a, b) < 1e-12
    if Tq < Tk:
        top_left = sdpa(q, k, v, causal=True)                      # is_causal aligns top-left
        assert max_rel_err(top_left, ref) > 1e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_causal_suffix_low_precision(dtype, tol):
    q, k, v = _suffix_inputs(32, 96, 4, 2, dtype=dtype)
    o = causal_suffix_attention(q, k, v)
    ref = suffix_reference(*(x.detach().double() for x in (q, k, v)))
    assert o.dtype == dtype and max_rel_err(o.double(), ref) < tol


def test_lower_right_bias_path_agrees():
    """The CUDA branch (SDPA's lower-right causal bias) has the same alignment; on CPU it runs materialised."""
    q, k, v = _suffix_inputs(12, 40, 2, 2)
    o = lower_right_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert max_rel_err(o, suffix_reference(q, k, v)) < 1e-12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_causal_suffix_cuda(dtype, tol):
    q, k, v = (x.detach().cuda().to(dtype).requires_grad_(True) for x in _suffix_inputs(256, 1024, 8, 2))
    o = causal_suffix_attention(q, k, v)
    ref = suffix_reference(*(x.detach().cpu().double().requires_grad_(True) for x in (q, k, v)))
    assert max_rel_err(o.double().cpu(), ref) < tol
    o.float().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_piecewise_cuda_bf16():
    """The CUDA branch (aten FlashAttention per block, merged by log-sum-exp): outputs and gradients against the
    fp64 reference on CPU at bf16 tolerance."""
    cpu = _piecewise_case(4, 2)
    gpu = [x.detach().cuda().bfloat16().requires_grad_(True) for x in cpu]
    o = piecewise_attention(*gpu[:3], RUNS, kv_sources=gpu[3])
    ref = piecewise_reference(*cpu, RUNS, True)
    assert max_rel_err(o.double().cpu(), ref) < 2e-2
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = torch.autograd.grad((o.double() * w.cuda()).sum(), gpu)
    for a, b in zip(got, torch.autograd.grad((ref * w).sum(), cpu)):
        assert max_rel_err(a.double().cpu(), b) < 5e-2
