"""The chunked torch backend against the step-by-step naive reference.

Tolerances (norm-relative, max|a-b| / max|b|):
- fp64 inputs: 1e-10. Both paths compute the same sums in a different order; fp64 rounding differences are
  ~1e-14 per operation and grow at most with the number of terms (T <= 200 here), far below 1e-10.
- fp32 inputs vs the fp64 reference: 1e-4. fp32 unit roundoff is 6e-8; sums of up to ~200 terms of O(1) products
  with cancellation give errors of O(1e-6) measured; 1e-4 leaves margin while a wrong term (a missing decay, a state
  from the wrong chunk) produces errors of O(1e-1) and fails (see the negative controls).
"""
from __future__ import annotations

import pytest
import torch

from lsp.ops import linear_attention

from .linear_cases import DECAY_FORMS, assert_close, make_inputs, max_rel_err, run_with_grads

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _ref(q, k, v, g, s0, **kw):
    to64 = lambda x: None if x is None else x.detach().double().requires_grad_(True)  # noqa: E731
    return run_with_grads(linear_attention, *map(to64, (q, k, v, g, s0)), backend="naive", **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", DECAY_FORMS)
@pytest.mark.parametrize("T,init", [(64, False), (45, True), (130, True), (1, True)])
def test_torch_matches_naive(form, T, init, dtype):
    q, k, v, g, s0 = make_inputs(form, T=T, dtype=dtype, init=init)
    res = run_with_grads(linear_attention, q, k, v, g, s0, backend="torch")
    assert_close(res, _ref(q, k, v, g, s0), TOL[dtype], f"{form} T={T}")
    assert res["o"].dtype == dtype


@pytest.mark.parametrize("form", DECAY_FORMS)
def test_varlen_matches_naive(form):
    # boundaries inside a chunk, on a chunk edge (64), an empty sequence, and a sequence of length 1
    cu = torch.tensor([0, 10, 10, 64, 65, 150], dtype=torch.int32)
    q, k, v, g, s0 = make_inputs(form, B=1, T=150, n_seq=5)
    res = run_with_grads(linear_attention, q, k, v, g, s0, backend="torch", cu_seqlens=cu)
    assert_close(res, _ref(q, k, v, g, s0, cu_seqlens=cu), TOL[torch.float64], f"varlen {form}")


@pytest.mark.parametrize("form", DECAY_FORMS)
def test_varlen_equals_separate_runs(form):
    """Packing is exactly running each sequence on its own: no state leaks across a boundary."""
    cu = [0, 37, 100]
    q, k, v, g, s0 = make_inputs(form, B=1, T=100, n_seq=2, requires_grad=False)
    o, s = linear_attention(q, k, v, g, initial_state=s0, output_final_state=True,
                            cu_seqlens=torch.tensor(cu, dtype=torch.int32), backend="torch")
    for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        g_n = g if g is None or g.dim() == 1 else g[:, a:b]
        o_n, s_n = linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], g_n, initial_state=s0[n : n + 1],
                                    output_final_state=True, backend="torch")
        assert max_rel_err(o[:, a:b], o_n) < 1e-12
        assert max_rel_err(s[n : n + 1], s_n) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("form", DECAY_FORMS)
def test_state_chaining(form, backend):
    """Two halves, passing the first half's final state as the second's initial state, equal one run."""
    q, k, v, g, s0 = make_inputs(form, T=90, requires_grad=False)
    o, s = linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend=backend)
    h = 41
    part = lambda x, a, b: None if x is None else (x if x.dim() == 1 else x[:, a:b])  # noqa: E731
    o1, s1 = linear_attention(*(part(x, 0, h) for x in (q, k, v, g)), initial_state=s0, output_final_state=True,
                              backend=backend)
    o2, s2 = linear_attention(*(part(x, h, 90) for x in (q, k, v, g)), initial_state=s1, output_final_state=True,
                              backend=backend)
    assert max_rel_err(torch.cat([o1, o2], 1), o) < 1e-12
    assert max_rel_err(s2, s) < 1e-12


@pytest.mark.parametrize("form", ["scalar", "key"])
def test_strong_decay_is_stable_in_fp32(form):
    """Cumulative log-decays reach about -4000 inside a chunk; nothing may overflow (no exp of large positives)."""
    q, k, v, g, s0 = make_inputs(form, T=128, dtype=torch.float32, strength=60.0)
    res = run_with_grads(linear_attention, q, k, v, g, s0, backend="torch")
    for key, val in res.items():
        assert torch.isfinite(val).all(), key
    assert_close(res, _ref(q, k, v, g, s0), TOL[torch.float32], f"strong decay {form}")


def test_bf16_inputs():
    q, k, v, g, s0 = make_inputs("key", T=70, dtype=torch.bfloat16, init=True)
    o, s = linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="torch")
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    ref, _ = linear_attention(*(x.double() for x in (q, k, v, g)), initial_state=s0.double(), backend="naive")
    # bf16 has an 8-bit mantissa: the output rounding alone is 2^-8 ~ 4e-3 relative
    assert max_rel_err(o, ref) < 2e-2


def test_scale_default_and_explicit():
    q, k, v, g, _ = make_inputs("scalar", T=20, requires_grad=False, init=False)
    o_default, _ = linear_attention(q, k, v, g, backend="torch")
    o_half, _ = linear_attention(q, k, v, g, scale=0.5 * q.shape[-1] ** -0.5, backend="torch")
    assert max_rel_err(o_half, 0.5 * o_default) < 1e-12


# ---- negative controls: the comparison above must catch wrong math ---------------------------------------------

def test_negative_control_wrong_decay_is_caught():
    q, k, v, g, s0 = make_inputs("key", T=80)
    ref = _ref(q, k, v, g, s0)
    wrong = run_with_grads(linear_attention, q, k, v, 0.9 * g, s0, backend="torch")
    with pytest.raises(AssertionError):
        assert_close(wrong, ref, TOL[torch.float64])


def test_negative_control_dropped_initial_state_is_caught():
    q, k, v, g, s0 = make_inputs("scalar", T=80)
    ref = _ref(q, k, v, g, s0)
    o, _ = linear_attention(q, k, v, g, backend="torch")
    assert max_rel_err(o, ref["o"]) > 1e-3
