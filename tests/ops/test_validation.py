"""Bad arguments raise one ValueError naming the argument and the expected shape."""
from __future__ import annotations

import pytest
import torch

from lsp.ops import delta_rule, linear_attention, softmax_attention

q = torch.randn(2, 8, 2, 4)
v = torch.randn(2, 8, 2, 3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=q[0]), r"q must have shape \[B, T, H, K\]"),
        (dict(k=torch.randn(2, 8, 2, 5)), r"k must have the shape of q"),
        (dict(v=torch.randn(2, 7, 2, 3)), r"v must have shape \[B, T, H, V\]"),
        (dict(g=torch.randn(3)), r"g must have shape \[H\]"),
        (dict(g=torch.randn(2, 8, 2, 3)), r"g must have shape"),
        (dict(q=q.long()), r"q must be a floating tensor"),
        (dict(k=q.double()), r"q, k, v must share one dtype"),
        (dict(initial_state=torch.randn(2, 2, 4, 4)), r"initial_state must have shape \[B, H, K, V\]"),
        (dict(cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)), r"cu_seqlens requires B == 1"),
        (dict(backend="cuda"), r"backend must be one of"),
        (dict(q=torch.randn(2, 8, 2, 300), k=torch.randn(2, 8, 2, 300)), r"head dims must be <= 256"),
    ],
)
def test_linear_attention_errors(kwargs, match):
    args = dict(q=q, k=q.clone(), v=v, g=None, initial_state=None, cu_seqlens=None, backend="torch")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), **args)


def test_bad_cu_seqlens_values():
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T=8"):
        linear_attention(q[:1], q[:1], v[:1], cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, K, V\]"):
        linear_attention(q[:1], q[:1], v[:1], cu_seqlens=torch.tensor([0, 5, 8], dtype=torch.int32),
                         initial_state=torch.randn(1, 2, 4, 3))


def test_triton_backend_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA device or TRITON_INTERPRET=1"):
        linear_attention(q, q, v, backend="triton")


def test_softmax_attention_errors():
    with pytest.raises(ValueError, match="q heads .* must be a multiple of kv heads"):
        softmax_attention(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="cu_seqlens requires B == 1"):
        softmax_attention(torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8),
                          cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(v=torch.randn(2, 8, 3, 3)), r"v's heads HV=3 must be a multiple G·H of the H=2 heads of q and k "
                                          r"\(grouped value heads\): q \(2, 8, 2, 4\), v \(2, 8, 3, 3\)"),
        (dict(g=torch.randn(2, 8, 2)), r"g \(log-decay\) must be None, \[B, T, HV\]=\[2, 8, 4\] or "
                                       r"\[B, T, HV, K\]=\[2, 8, 4, 4\] for the delta rule, got \(2, 8, 2\)"),
        (dict(g=torch.randn(2, 8, 4, 3)), r"g \(log-decay\) must be None, .* got \(2, 8, 4, 3\)"),
        (dict(g=torch.randn(4)), r"g \(log-decay\) must be None, .* got \(4,\)"),
        (dict(beta=torch.rand(2, 8, 2)), r"beta must be a floating tensor \[B, T, HV\]=\[2, 8, 4\]"),
        (dict(initial_state=torch.randn(2, 2, 4, 3)), r"initial_state must have shape \[B, H, K, V\]=\[2, 4, 4, 3\]"),
        (dict(k=torch.randn(2, 8, 4, 4)), r"k must have the shape of q"),
    ],
)
def test_delta_rule_errors(kwargs, match):
    """Grouped value heads (q, k: H = 2 heads; v, beta, g, the state: HV = 4): one line naming the shapes."""
    args = dict(q=q, k=q.clone(), v=torch.randn(2, 8, 4, 3), beta=torch.rand(2, 8, 4), g=-torch.rand(2, 8, 4, 4),
                initial_state=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        delta_rule(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("beta"), args.pop("g"), **args)
