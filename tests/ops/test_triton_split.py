"""The two differentiable pieces of the Triton op that sequence parallelism calls separately:

    h, final = triton_chunk_states(k, v, g4, initial_state, cu_seqlens)    # h_c = state entering chunk c
    o        = triton_chunk_output(q, k, v, g4, h, scale, cu_seqlens)       # o from the given entering states

Reference (independent of the chunk kernels): the naive fp64 recurrence run chunk by chunk in the padded layout of
`make_layout`. Chunk c of a sequence starts from h_c (its running state, or a given h for the output piece), so
h_ref[c] is the state after the first c chunks and o_ref is the recurrence of each chunk from h_c. Gradients that
enter only through h, only through final, or only through o are compared with autograd of that reference.
Tolerances as in test_triton.py (1e-4 norm-relative for fp32 against fp64, 5e-4 for dg of [H] decay); the negative
controls (h as the state *after* chunk c; o reading the next chunk's state) differ by O(1e-1).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from lsp.ops.linear.checks import seq_bounds  # noqa: E402
from lsp.ops.linear.layout import make_layout  # noqa: E402
from lsp.ops.linear.naive import naive_recurrence  # noqa: E402
from lsp.ops.linear.triton_chunk import CHUNK_SIZE, kern, triton_chunk_output, triton_chunk_states  # noqa: E402

from .linear_cases import DECAY_FORMS, make_inputs, max_rel_err  # noqa: E402
from .triton_interp import interpreter_bf16_dot  # noqa: E402,F401

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and type(kern._fwd_state_kernel).__name__ != "InterpretedFunction",
    reason="no CUDA, and the Triton kernels were imported without TRITON_INTERPRET=1",
)
CU = torch.tensor([0, 10, 10, 70, 71, 130], dtype=torch.int32)  # boundaries inside chunks, empty, length 1


def _segments(B, T, cu):
    # -> [(rows, start, end, first chunk, state index)] of the padded layout, and (R, NC)
    bounds = seq_bounds(cu, B, T)
    layout = make_layout(B, T, bounds, CHUNK_SIZE, "cpu")
    if bounds is None:
        return [(slice(0, B), 0, T, 0, slice(0, B))], layout
    first = {n: c for c, n in layout.resets.items()}
    segs = [(slice(0, 1), s, e, first[n], slice(n, n + 1)) for n, (s, e) in enumerate(bounds) if e > s]
    return segs, layout


def chunked_naive(q, k, v, g4, s0, scale, cu=None, h_in=None, exiting=False):
    """fp64 recurrence chunk by chunk -> (o [B, T, H, V], h [R, H, NC, K, V], final [n, H, K, V]).

    Chunk c starts from the running state, or from h_in[:, :, c] when given. exiting=True records the state after
    chunk c instead of before it (the deliberately wrong definition of the negative control)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    segs, layout = _segments(B, T, cu)
    g = None if g4 is None else g4.expand(B, T, H, g4.shape[-1])
    h = q.new_zeros(layout.rows, H, layout.num_chunks, K, V)
    n_states = B if cu is None else len(cu) - 1
    final = q.new_zeros(n_states, H, K, V) if s0 is None else s0.clone()
    o = q.new_zeros(B, T, H, V)
    for rows, s, e, c0, idx in segs:
        state = None if s0 is None else s0[idx]
        for c, a in enumerate(range(s, e, CHUNK_SIZE)):
            b = min(a + CHUNK_SIZE, e)
            start = h_in[rows, :, c0 + c] if h_in is not None else state
            part = lambda x: None if x is None else x[rows, a:b]  # noqa: E731
            o_c, after = naive_recurrence(part(q), part(k), part(v), part(g), scale, start)
            h[rows, :, c0 + c] = after if exiting else (start if start is not None else 0.0)
            o[rows, a:b] = o_c
            state = after
        final[idx] = state
    return o, h, final


def _leaves(xs, dtype=None):
    return [None if x is None else x.detach().to(dtype or x.dtype).requires_grad_(True) for x in xs]


def _grads(out, w, inputs):
    got = torch.autograd.grad((out.double() * w).sum(), [x for x in inputs if x is not None], allow_unused=True)
    return [torch.zeros_like(x) if gr is None else gr for x, gr in zip([x for x in inputs if x is not None], got)]


def _g4(g):
    # [H] -> [1, 1, H, 1]; [B, T, H] -> [B, T, H, 1]; [B, T, H, K] as is (the shapes linear_attention passes)
    if g is None or g.dim() == 4:
        return g
    return g.view(1, 1, -1, 1) if g.dim() == 1 else g.unsqueeze(-1)


def _tol(form, i):
    return 5e-4 if form == "head" and i == 2 else 1e-4


def _states_case(form, packed, through, exiting=False):
    # -> max relative errors of (value, dk, dv, dg, dinit) for a loss on h ("h") or on final ("final") only
    B, T = (1, 130) if packed else (2, 77)
    cu = CU if packed else None
    q, k, v, g, s0 = make_inputs(form, B=B, T=T, H=2, K=8, V=16, dtype=torch.float32, n_seq=5 if packed else None)
    xs = _leaves([k, v, g, s0])
    refs = _leaves([k, v, g, s0], torch.float64)
    h, final = triton_chunk_states(xs[0], xs[1], _g4(xs[2]), xs[3], cu)
    _, h_ref, final_ref = chunked_naive(q.double(), refs[0], refs[1], _g4(refs[2]), refs[3],
                                        1.0, cu, exiting=exiting)
    got, want = (h, h_ref) if through == "h" else (final, final_ref)
    w = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    errs = [max_rel_err(got.detach(), want.detach())]
    errs += [max_rel_err(a, b) for a, b in zip(_grads(got, w, xs), _grads(want, w, refs))]
    return errs


@pytest.mark.parametrize("form", DECAY_FORMS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("through", ["h", "final"])
def test_chunk_states_and_their_gradients(form, packed, through):
    errs = _states_case(form, packed, through)
    for i, err in enumerate(errs):
        assert err <= _tol(form, i), f"{form} packed={packed} loss on {through}: entry {i} error {err:.3e}"


@pytest.mark.parametrize("form", ["none", "key"])
def test_chunk_states_negative_control(form):
    """h defined as the state after chunk c (not before it) must be rejected by the same comparison."""
    errs = _states_case(form, False, "h", exiting=True)
    assert errs[0] > 10 * _tol(form, 0) and max(errs[1:]) > 10 * _tol(form, 1), errs


def _output_case(form, packed, shift=0):
    # -> max relative errors of (o, dq, dk, dv, dg, dh) for o from a given (random) h, fp32 output of bf16-free inputs
    B, T = (1, 130) if packed else (2, 77)
    cu = CU if packed else None
    q, k, v, g, s0 = make_inputs(form, B=B, T=T, H=2, K=8, V=16, dtype=torch.float32, n_seq=5 if packed else None)
    _, layout = _segments(B, T, cu)
    h0 = torch.randn(layout.rows, 2, layout.num_chunks, 8, 16, generator=torch.Generator().manual_seed(5))
    xs = _leaves([q, k, v, g, h0])
    refs = _leaves([q, k, v, g, h0], torch.float64)
    o = triton_chunk_output(*xs[:3], _g4(xs[3]), xs[4], 0.5, cu, out_dtype=torch.float32)
    h_used = refs[4].roll(shift, dims=2) if shift else refs[4]
    o_ref = chunked_naive(*refs[:3], _g4(refs[3]), None, 0.5, cu, h_in=h_used)[0]
    w = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    errs = [max_rel_err(o.detach(), o_ref.detach())]
    return errs + [max_rel_err(a, b) for a, b in zip(_grads(o, w, xs), _grads(o_ref, w, refs))]


@pytest.mark.parametrize("form", DECAY_FORMS)
@pytest.mark.parametrize("packed", [False, True])
def test_chunk_output_and_its_gradients(form, packed):
    errs = _output_case(form, packed)
    for i, err in enumerate(errs):
        tol = 5e-4 if form == "head" and i == 4 else 1e-4
        assert err <= tol, f"{form} packed={packed}: entry {i} (o, dq, dk, dv, dg, dh) error {err:.3e}"


def test_chunk_output_negative_control():
    """Reading the next chunk's state must be rejected by the same comparison (o and dh)."""
    errs = _output_case("scalar", False, shift=-1)
    assert errs[0] > 1e-3 and errs[-1] > 1e-3, errs


def test_chunk_output_dtype():
    """bf16 inputs, out_dtype=fp32: the output is not rounded to bf16 (SP adds its correction before rounding)."""
    q, k, v, g, s0 = make_inputs("key", B=1, T=20, H=1, K=8, V=8, dtype=torch.bfloat16, requires_grad=False)
    h, _ = triton_chunk_states(k, v, g, None)
    o32 = triton_chunk_output(q, k, v, g, h, 0.5, out_dtype=torch.float32)
    o16 = triton_chunk_output(q, k, v, g, h, 0.5)
    assert o32.dtype == torch.float32 and o16.dtype == torch.bfloat16
    assert torch.equal(o32.to(torch.bfloat16), o16)  # the same fp32 accumulator, rounded once
    assert (o32 - o16.float()).abs().max() > 0  # o32 really carries more bits than bf16
