"""fla's own DPLR test cases (tests/ops/test_dplr_delta.py of flash-linear-attention: shapes, scales, gate
normalisers, gate masking, packed lengths, input dtypes and tolerances) run on lsp's chunked path against lsp's fp64
step-by-step reference. fla's tolerance is a ratio: rms(error) / rms(reference), passed outright when the largest
absolute error is <= 1e-6. The T >= 1000 cases are slow; the first case of each group stays in the default suite."""
import pytest
import torch
import torch.nn.functional as F

from lsp.ops import dplr_delta_rule


def fla_assert_close(name, ref, got, ratio):
    # fla.utils.assert_close: rms error relative to the reference's rms, unless the max error is already tiny
    diff = (ref.double() - got.double()).flatten()
    if diff.abs().max().item() <= 1e-6:
        return
    err = diff.square().mean().sqrt().item() / (ref.double().flatten().square().mean().sqrt().item() + 1e-8)
    assert err < ratio, f"{name}: error ratio {err:.2e} >= {ratio}"


def fla_inputs(B, T, H, D, dtype, normalizer=1.0, mask_p=0.0, n_seq=None):
    """fla's recipe: q, k, v ~ N(0, 1); a = normalize(U(0, 1)), b = -a; gk = logsigmoid(N(0, 1)) / normaliser,
    zeroed with probability mask_p; h0 ~ N(0, 1) in fp32."""
    torch.manual_seed(42)
    q, k, v = (torch.randn(B, T, H, D, dtype=dtype) for _ in range(3))
    a = F.normalize(torch.rand(B, T, H, D, dtype=dtype), p=2, dim=-1)
    gk = F.logsigmoid(torch.randn(B, T, H, D)) / normalizer
    gk = gk * (torch.rand_like(gk) > mask_p)
    h0 = torch.randn(n_seq or B, H, D, D)
    return [t.requires_grad_() for t in (q, k, v, a, -a, gk.to(dtype), h0)]


def _grads(o, ht, leaves, seed=7):
    gen = torch.Generator().manual_seed(seed)
    do, dht = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (o, ht))
    return torch.autograd.grad((o.double() * do).sum() + (ht.double() * dht).sum(), leaves)


def _compare(leaves, scale, cu=None, with_grads=True, tol_o=0.007, tol=0.008, check_dg=True, backend="auto"):
    x64 = [t.detach().double().requires_grad_() for t in leaves]
    kw = {"scale": scale, "output_final_state": True, "cu_seqlens": cu}
    o, ht = dplr_delta_rule(*leaves[:6], initial_state=leaves[6], backend=backend, **kw)
    ref_o, ref_ht = dplr_delta_rule(*x64[:6], initial_state=x64[6], backend="naive", **kw)
    fla_assert_close("o", ref_o, o, tol_o)
    fla_assert_close("ht", ref_ht, ht, tol)
    if not with_grads:
        return
    names = ("dq", "dk", "dv", "da", "db", "dg", "dh0")
    for name, ref, got in zip(names, _grads(ref_o, ref_ht, x64), _grads(o, ht, leaves)):
        if name != "dg" or check_dg:
            fla_assert_close(name, ref, got, tol)


def _slow_after_first(cases):
    return [c if i == 0 else pytest.param(*c, marks=pytest.mark.slow) for i, c in enumerate(cases)]


# fla's test_recurrent_fwd: (B, T, H, D, scale, dtype), gk = logsigmoid / 16, forward only, tolerance 0.001
@pytest.mark.parametrize("B,T,H,D,scale,dtype", _slow_after_first([
    (1, 63, 1, 64, 1, torch.float), (2, 1024, 4, 60, 1, torch.float), (2, 1024, 8, 128, 1, torch.float),
    (2, 1024, 8, 128, 0.1, torch.float), (4, 2048, 8, 64, 0.1, torch.float), (2, 1024, 8, 128, 1, torch.float16)]))
def test_fla_recurrent_fwd(B, T, H, D, scale, dtype):
    with torch.no_grad():
        leaves = [t.detach() for t in fla_inputs(B, T, H, D, dtype, normalizer=16.0)]
    _compare(leaves, scale, with_grads=False, tol_o=0.001, tol=0.001)


# fla's test_chunk: (B, T, H, D, scale, gate_logit_normalizer, mask_p, dtype); dg is checked when normaliser >= 1
@pytest.mark.parametrize("B,T,H,D,scale,normalizer,mask_p,dtype", _slow_after_first([
    (1, 63, 1, 64, 1, 1, 0, torch.float16), (2, 1000, 3, 60, 1, 1, 0, torch.float16),
    (2, 1024, 3, 64, 0.1, 1, 0.5, torch.float16), (2, 1024, 4, 100, 1, 0.1, 0, torch.float16),
    (2, 1024, 4, 128, 0.1, 1, 0, torch.float16), (2, 1024, 4, 128, 0.1, 1, 0.5, torch.float16),
    (2, 1024, 4, 128, 0.1, 10, 0, torch.float16), (4, 2048, 8, 64, 0.1, 1, 0, torch.float16)]))
def test_fla_chunk(B, T, H, D, scale, normalizer, mask_p, dtype):
    _compare(fla_inputs(B, T, H, D, dtype, normalizer, mask_p), scale, check_dg=normalizer >= 1)


# fla's test_chunk_varlen: (H, D, mask_p, cu_seqlens), fp16 inputs, default scale, every gradient
@pytest.mark.parametrize("H,D,mask_p,cu", _slow_after_first([
    (4, 64, 0, [0, 15]), (4, 64, 0, [0, 256, 500, 1000]), (4, 64, 0.5, [0, 256, 500, 1000]),
    (4, 100, 0, [0, 15, 100, 300, 1111, 1599, 2000])]))
def test_fla_chunk_varlen(H, D, mask_p, cu):
    cu = torch.tensor(cu, dtype=torch.int32)
    leaves = fla_inputs(1, int(cu[-1]), H, D, torch.float16, mask_p=mask_p, n_seq=cu.numel() - 1)
    _compare(leaves, None, cu=cu)
