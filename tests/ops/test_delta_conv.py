"""short_conv against torch's conv1d run on every document separately (left zero padding), gradients included."""
import pytest
import torch
import torch.nn.functional as F

from lsp.ops.delta import short_conv

from .linear_cases import max_rel_err


def conv1d_reference(x, weight, bias, cu):
    # x: [1, T, D] -> per document: conv1d with k - 1 zeros on the left, depthwise
    k = weight.shape[-1]
    parts = []
    for s, e in zip(cu[:-1], cu[1:]):
        xs = F.pad(x[:, s:e].transpose(1, 2), (k - 1, 0))
        parts.append(F.conv1d(xs, weight[:, None, :], bias, groups=x.shape[-1]).transpose(1, 2))
    return torch.cat(parts, dim=1)


def _inputs(T=40, D=6, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
            for s in ((1, T, D), (D, k), (D,))]


@pytest.mark.parametrize("cu", [[0, 40], [0, 1, 3, 17, 18, 40], [0, 2, 40]])
def test_matches_conv1d_per_document(cu):
    x, w, b = _inputs()
    y = short_conv(x, w, b, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    ref = conv1d_reference(x, w, b, cu)
    weights = torch.randn_like(ref)
    got = torch.autograd.grad((y * weights).sum(), (x, w, b))
    want = torch.autograd.grad((ref * weights).sum(), (x, w, b))
    assert max_rel_err(y, ref) < 1e-13
    for a, r in zip(got, want):
        assert max_rel_err(a, r) < 1e-13


def test_negative_control_leaking_across_documents_is_caught():
    x, w, b = _inputs()
    cu = [0, 1, 3, 17, 18, 40]
    leaky = short_conv(x, w, b)  # one document: inputs of the previous document leak in
    assert max_rel_err(leaky, conv1d_reference(x, w, b, cu)) > 1e-2


def test_halo_without_seq_ids_is_rejected():
    x, w, b = _inputs()
    with pytest.raises(ValueError, match="halo together with seq_ids"):
        short_conv(x, w, b, halo=torch.zeros(1, 3, 6, dtype=torch.float64))
