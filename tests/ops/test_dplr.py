"""dplr_delta_rule: the chunked WY path equals the fp64 step-by-step recurrence (outputs, final states, the
gradients of every input), b = 0 is GLA, the reference itself equals the dense-transition form, a wrong term order
fails, fla's own DPLR cases pass against the reference, and bad input gets one clear error."""
import pytest
import torch
import torch.nn.functional as F

from lsp.ops import dplr_delta_rule, linear_attention
from lsp.ops.dplr.chunk import chunk_dplr_delta_rule

from .linear_cases import max_rel_err

NAMES = ("q", "k", "v", "a", "b", "g", "initial_state")


def make_dplr_inputs(B=2, T=45, H=2, K=8, V=6, dtype=torch.float64, seed=0, n_seq=None, decay=1.0):
    """RWKV-7-like inputs: a = -κ̂, b = κ̂ ⊙ α (κ̂ unit, α in (0, 1)), g = decay · logsigmoid(·) <= 0."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    kappa = F.normalize(rnd(B, T, H, K), dim=-1)
    x = {"q": rnd(B, T, H, K), "k": rnd(B, T, H, K), "v": rnd(B, T, H, V), "a": -kappa,
         "b": kappa * torch.rand(B, T, H, K, generator=gen, dtype=torch.float64),
         "g": decay * F.logsigmoid(rnd(B, T, H, K) + 1.0), "initial_state": rnd(n_seq or B, H, K, V)}
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return {n: t.to(acc if n == "initial_state" else dtype).requires_grad_() for n, t in x.items()}


def detached64(x):
    return {n: t.detach().double().requires_grad_() for n, t in x.items()}


def run_with_grads(fn, x, seed=1, **kwargs):
    """fn(q, k, v, a, b, g, initial_state=..., output_final_state=True): output, final state and every input's
    gradient under a loss that weights every output and state entry differently."""
    o, s = fn(*(x[n] for n in NAMES[:-1]), initial_state=x["initial_state"], output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    w_o, w_s = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (o, s))
    grads = torch.autograd.grad((o.double() * w_o).sum() + (s.double() * w_s).sum(), [x[n] for n in NAMES],
                                allow_unused=True, materialize_grads=True)    # GLA (b = 0) never reads a, b
    return {"o": o.detach(), "final_state": s.detach(), **{f"d{n}": gr for n, gr in zip(NAMES, grads)}}


def chunked(chunk_size):
    # the chunked path with a chosen chunk size (the public op uses C = 64), same calling convention as the op
    def fn(q, k, v, a, b, g, initial_state=None, output_final_state=False, cu_seqlens=None):
        return chunk_dplr_delta_rule(q, k, v, a, b, g, q.shape[-1] ** -0.5, initial_state, output_final_state,
                                     cu_seqlens, chunk_size)
    return fn


def naive(**kwargs):
    return lambda *args, **kw: dplr_delta_rule(*args, backend="naive", **kw, **kwargs)


def _errors(got, ref):
    return {n: max_rel_err(got[n], ref[n]) for n in ref}


@pytest.mark.parametrize("T,chunk_size", [(45, 16), (100, 64), (128, 32), (1, 16)])
def test_chunked_equals_recurrence_fp64(T, chunk_size):
    # fp64 on both sides: only rounding differs (~1e-15 relative); T not a multiple of the chunk pads exactly
    x = make_dplr_inputs(T=T)
    err = _errors(run_with_grads(chunked(chunk_size), x), run_with_grads(naive(), x))
    assert max(err.values()) < 1e-10, err


@pytest.mark.parametrize("cu", [[0, 5, 40, 41, 100], [0, 64, 128], [0, 17, 17, 90]])
def test_packed_equals_recurrence_fp64(cu):
    """Documents starting mid-chunk, on a chunk edge, one token long and empty: the state resets at each start."""
    cu = torch.tensor(cu, dtype=torch.int32)
    x = make_dplr_inputs(B=1, T=int(cu[-1]), n_seq=cu.numel() - 1)
    ref = run_with_grads(naive(cu_seqlens=cu), x)
    err = _errors(run_with_grads(chunked(32), x, cu_seqlens=cu), ref)
    assert max(err.values()) < 1e-10, err
    err = _errors(run_with_grads(dplr_delta_rule, x, cu_seqlens=cu), ref)       # the public op, C = 64
    assert max(err.values()) < 1e-10, err


def test_strong_decay_does_not_overflow():
    """Gates down to exp(-40) per token: every exponent of the chunked path is a difference <= 0."""
    x = make_dplr_inputs(T=70, decay=40.0)
    got = run_with_grads(dplr_delta_rule, x)
    assert all(torch.isfinite(t).all() for t in got.values())
    err = _errors(got, run_with_grads(naive(), x))
    assert max(err.values()) < 1e-10, err


def test_fp32_inputs_close_to_fp64_reference():
    # fp32 accumulation over T = 100 of a contractive map: ~1e-6 relative, 1e-4 bound
    x = make_dplr_inputs(T=100, dtype=torch.float32)
    err = _errors(run_with_grads(dplr_delta_rule, x), run_with_grads(naive(), detached64(x)))
    assert max(err.values()) < 1e-4, err


def test_reference_equals_dense_transition_form():
    """The reference against an independent writing: S_t = (Diag(exp g_t) + b_t a_tᵀ) S_{t-1} + k_t v_tᵀ with the
    K × K transition built as a matrix (the form whose product over a segment SP composes)."""
    x = {n: t.detach() for n, t in make_dplr_inputs(B=1, T=20, H=1).items()}
    o, s = dplr_delta_rule(*(x[n] for n in NAMES[:-1]), initial_state=x["initial_state"], output_final_state=True,
                           backend="naive", scale=1.0)
    state = x["initial_state"][0, 0]
    for t in range(20):
        q, k, v, a, b, g = (x[n][0, t, 0] for n in NAMES[:-1])
        state = (torch.diag(g.exp()) + torch.outer(b, a)) @ state + torch.outer(k, v)
        assert torch.allclose(o[0, t, 0], q @ state, rtol=1e-12, atol=1e-12)
    assert torch.allclose(s[0, 0], state, rtol=1e-12, atol=1e-12)


def test_b_zero_is_gla():
    """With b = 0 the rule is gated linear attention with per-key decay; a then gets no gradient."""
    x = make_dplr_inputs(T=80)
    zero_b = dict(x, b=torch.zeros_like(x["b"]).requires_grad_())
    got = run_with_grads(dplr_delta_rule, zero_b)
    gla = lambda q, k, v, a, b, g, **kw: linear_attention(q, k, v, g, backend="naive", **kw)  # noqa: E731
    ref = run_with_grads(gla, zero_b)
    names = ("o", "final_state", "dq", "dk", "dv", "dg", "dinitial_state")
    err = _errors({n: got[n] for n in names}, {n: ref[n] for n in names})
    assert max(err.values()) < 1e-10, err
    assert torch.equal(got["da"], torch.zeros_like(got["da"]))


def _wrong_order_recurrence(read_after, x, scale):
    # the negative control's recurrence: a reads the state after the decay ("decay") or after the write ("write")
    q, k, v, a, b, g = (x[n][0, :, 0] for n in NAMES[:-1])
    state, outs = x["initial_state"][0, 0], []
    for t in range(q.shape[0]):
        decayed = g[t].exp()[:, None] * state
        written = decayed + torch.outer(k[t], v[t])
        read = a[t] @ {"decay": decayed, "write": written}[read_after]
        state = written + torch.outer(b[t], read)
        outs.append(scale * q[t] @ state)
    return torch.stack(outs)


@pytest.mark.parametrize("read_after", ["decay", "write"])
def test_negative_control_wrong_term_order_fails(read_after):
    """A recurrence whose low-rank read sees the decayed (or the written) state is a different map: the chunked
    path must disagree with it by far more than the tolerance the tests use."""
    x = {n: t.detach() for n, t in make_dplr_inputs(B=1, T=60, H=1).items()}
    o, _ = dplr_delta_rule(*(x[n] for n in NAMES[:-1]), initial_state=x["initial_state"])
    wrong = _wrong_order_recurrence(read_after, x, 8 ** -0.5)
    assert max_rel_err(wrong, o[0, :, 0]) > 1e-3


@pytest.mark.parametrize("name,bad,match", [
    ("a", lambda x: x[..., :-1], r"^a must be a floating tensor of q's shape \[B, T, H, K\]=\[2, 45, 2, 8\], got"),
    ("b", lambda x: x.long(), r"^b must be a floating tensor"),
    ("g", lambda x: x[:, :, :, 0], r"^g must be a floating tensor of q's shape"),
    ("v", lambda x: x[:, :-1], r"^v must have shape"),
])
def test_bad_input_names_it(name, bad, match):
    x = {n: t.detach() for n, t in make_dplr_inputs().items()}
    x[name] = bad(x[name])
    with pytest.raises(ValueError, match=match):
        dplr_delta_rule(*(x[n] for n in NAMES[:-1]))


def test_unknown_backend_names_the_choices():
    x = {n: t.detach() for n, t in make_dplr_inputs(T=4).items()}
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'naive'\) .* got 'triton'"):
        dplr_delta_rule(*(x[n] for n in NAMES[:-1]), backend="triton")


def test_autocast_does_not_change_the_result():
    x = {n: t.detach() for n, t in make_dplr_inputs(T=40, dtype=torch.float32).items()}
    plain, _ = dplr_delta_rule(*(x[n] for n in NAMES[:-1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, _ = dplr_delta_rule(*(x[n] for n in NAMES[:-1]))
    assert torch.equal(cast, plain)


@pytest.mark.parametrize("K, V", [(16, 32), (32, 16)])
def test_flops_formula_is_what_flopcounter_counts(K, V):
    """dplr_flops_per_token (the planner's and the rwkv7 kind's count) equals FlopCounterMode's count of the chunked
    path, forward and backward, for rows of 1, 2 and 3 chunks (K != V both ways, so that each term's dims are
    seen); control: the delta rule's formula does not."""
    from torch.utils.flop_counter import FlopCounterMode

    from lsp.ops.dplr import dplr_flops_per_token
    from lsp.plan.costmodel import delta_flops_per_token

    for chunks in (1, 2, 3):
        x = make_dplr_inputs(B=1, T=64 * chunks, H=1, K=K, V=V, dtype=torch.float32)
        with FlopCounterMode(display=False) as fwd:
            o, _ = dplr_delta_rule(*(x[n] for n in NAMES[:-1]), backend="torch")
        with FlopCounterMode(display=False) as bwd:
            o.sum().backward()
        counted = (fwd.get_total_flops() / (64 * chunks), bwd.get_total_flops() / (64 * chunks))
        assert counted == dplr_flops_per_token(64, K, V, chunks), (chunks, counted)
        assert counted != delta_flops_per_token(64, K, V, chunks)
