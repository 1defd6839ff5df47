"""Kimi Delta Attention (a gate per key channel) and grouped value heads in `delta_rule`.

The naive path is checked against the recurrence written as matrices in this file,

    S_t = (I - beta_t k_t k_tᵀ) Diag(exp g_t) S_{t-1} + beta_t k_t v_tᵀ,    o_t = scale · q_t S_t,

value head j reading q/k head j // G; the chunked path against the naive one (outputs, final states and the
gradients of q, k, v, beta, g and the initial state). Tolerances (norm-relative, as tests/ops/test_delta.py):
fp64 1e-9 (measured ~2e-15 at T = 128: the same sums in another order, one unit-triangular solve per chunk); fp32
against the fp64 reference 1e-4 (measured ~5e-7). The negative controls (the gate after the erase, the wrong group
order, a per-key decay averaged over the keys) are off by O(1e-1).
"""
from __future__ import annotations

import pytest
import torch

from lsp.ops import delta_rule
from lsp.ops.delta import chunk as chunk_mod
from lsp.ops.delta.chunk import chunk_forward, pair_products

from .delta_cases import detached64, make_delta_inputs, max_rel_err, run_delta_with_grads
from .linear_cases import assert_close

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
ARGS = ("q", "k", "v", "beta", "g")


def matrix_recurrence(q, k, v, beta, g, scale, h0, gate_first=True):
    """The recurrence as explicit K x K matrices, fp64 (gate_first=False: the gate after the erase, a wrong model)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G = HV // H
    o, finals = torch.zeros(B, T, HV, V, dtype=torch.float64), torch.zeros(B, HV, K, V, dtype=torch.float64)
    eye = torch.eye(K, dtype=torch.float64)
    for b in range(B):
        for j in range(HV):
            S = h0[b, j].double().clone()
            for t in range(T):
                kt, bt = k[b, t, j // G].double(), beta[b, t, j].double()
                gate = g[b, t, j].double().expand(K) if g[b, t, j].dim() == 0 else g[b, t, j].double()
                D, E = torch.diag(gate.exp()), eye - bt * torch.outer(kt, kt)
                S = (E @ D if gate_first else D @ E) @ S + bt * torch.outer(kt, v[b, t, j].double())
                o[b, t, j] = scale * q[b, t, j // G].double() @ S
            finals[b, j] = S
    return o, finals


def _ref(x, **kw):
    return run_delta_with_grads(delta_rule, detached64(x), backend="naive", **kw)


@pytest.mark.parametrize("per_key,groups", [(True, 1), (True, 2), (False, 3)])
def test_naive_is_the_matrix_recurrence(per_key, groups):
    x = make_delta_inputs(True, T=20, H=2, K=6, V=5, per_key=per_key, groups=groups, requires_grad=False)
    o, s = delta_rule(*(x[n] for n in ARGS), scale=0.4, initial_state=x["initial_state"], output_final_state=True,
                      backend="naive")
    o_ref, s_ref = matrix_recurrence(*(x[n] for n in ARGS), 0.4, x["initial_state"])
    assert max_rel_err(o, o_ref) < 1e-12 and max_rel_err(s, s_ref) < 1e-12
    if per_key:  # the gate after the erase is another model: the comparison above would catch it
        o_wrong, _ = matrix_recurrence(*(x[n] for n in ARGS), 0.4, x["initial_state"], gate_first=False)
        assert max_rel_err(o, o_wrong) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("T,init", [(64, False), (45, True), (128, True), (1, True)])
def test_torch_matches_naive(T, init, groups, dtype):
    x = make_delta_inputs(True, T=T, dtype=dtype, init=init, per_key=True, groups=groups)
    res = run_delta_with_grads(delta_rule, x, backend="torch")
    assert_close(res, _ref(x), TOL[dtype], f"KDA T={T} G={groups}")
    assert res["o"].shape == x["v"].shape and res["dq"].shape == x["q"].shape and res["dg"].shape == x["g"].shape


@pytest.mark.parametrize("groups", [1, 2])
def test_varlen_matches_naive(groups):
    # boundaries inside a chunk, on a chunk edge (64), an empty sequence, and a sequence of length 1
    cu = torch.tensor([0, 10, 10, 64, 65, 128], dtype=torch.int32)
    x = make_delta_inputs(True, B=1, T=128, n_seq=5, per_key=True, groups=groups)
    res = run_delta_with_grads(delta_rule, x, backend="torch", cu_seqlens=cu)
    assert_close(res, _ref(x, cu_seqlens=cu), TOL[torch.float64], f"KDA varlen G={groups}")


@pytest.mark.parametrize("chunk_size", [16, 24, 32])
def test_other_chunk_sizes(chunk_size):
    """Chunks that are not 64 tokens: the sub-blocks of `pair_products` are gcd(C, 16) tokens (8 for C = 24)."""
    x = make_delta_inputs(True, T=100, per_key=True)
    fn = lambda *a, **kw: chunk_forward(*a[:5], 8 ** -0.5, kw["initial_state"], True, chunk_size=chunk_size)  # noqa
    assert_close(run_delta_with_grads(fn, x), run_delta_with_grads(
        delta_rule, detached64(x), backend="naive", scale=8 ** -0.5), TOL[torch.float64], f"C={chunk_size}")


def test_strong_key_decay_is_stable_in_fp32():
    """Per-channel cumulative log-decays reach about -4000 inside a chunk: exp(G_i) · exp(-G_j) would overflow fp32,
    the sub-block factorisation may not."""
    x = make_delta_inputs(True, T=128, dtype=torch.float32, strength=60.0, per_key=True)
    res = run_delta_with_grads(delta_rule, x, backend="torch")
    assert all(torch.isfinite(t).all() for t in res.values())
    assert_close(res, _ref(x), TOL[torch.float32], "strong key decay")


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("C", [64, 24])
def test_pair_products_equal_the_direct_sum(C, strict):
    """P_ij = Σ_d x_id y_jd exp(G_id - G_jd) on the causal pairs, against the [C, C, K] sum written out."""
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(3, C, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    G = (-10.0 * torch.rand(3, C, 8, generator=gen, dtype=torch.float64)).cumsum(1)      # reaches -100 to -300
    mask = torch.ones(C, C, dtype=torch.bool).tril(-1 if strict else 0)
    diff = torch.where(mask[..., None], G[:, :, None] - G[:, None], float("-inf"))
    direct = torch.einsum("bid,bjd,bijd->bij", x, y, diff.exp())
    assert max_rel_err(pair_products(x, y, G, strict), direct) < 1e-13
    assert max_rel_err(pair_products(x, y, G, not strict), direct) > 1e-3  # the diagonal matters: caught
    # why the sub-blocks: the one-factor form exp(G_i) x_i · exp(-G_j) y_j overflows in fp32 at this decay
    x32, y32, G32 = x.float(), y.float(), G.float()
    naive = ((x32 * G32.exp()) @ (y32 * (-G32).exp()).transpose(1, 2)) * mask
    assert not torch.isfinite(naive).all()


def test_gate_per_head_is_the_gate_per_key_broadcast():
    """g [B, T, HV] and the same gate repeated over the K channels are one model; dg is the sum over channels."""
    x = make_delta_inputs(True, T=70)
    per_key = {**detached64(x), "g": x["g"].detach()[..., None].expand(-1, -1, -1, 8).clone().requires_grad_()}
    a, b = run_delta_with_grads(delta_rule, x), run_delta_with_grads(delta_rule, per_key)
    assert max_rel_err(b["o"], a["o"]) < 1e-12 and max_rel_err(b["dg"].sum(-1), a["dg"]) < 1e-12


def test_grouped_heads_sum_the_gradients_of_the_group():
    """Grouped value heads equal the ungrouped op on q, k repeated per value head, whose q/k gradients summed
    over each group are the grouped ones."""
    x = make_delta_inputs(True, T=50, per_key=True, groups=3)
    flat = {**detached64(x), **{n: x[n].detach().repeat_interleave(3, dim=2).requires_grad_() for n in ("q", "k")}}
    a, b = run_delta_with_grads(delta_rule, x), run_delta_with_grads(delta_rule, flat)
    group_sum = lambda t: t.reshape(*t.shape[:2], 2, 3, t.shape[-1]).sum(3)  # noqa: E731
    assert max_rel_err(a["o"], b["o"]) < 1e-12
    assert max_rel_err(a["dq"], group_sum(b["dq"])) < 1e-12 and max_rel_err(a["dk"], group_sum(b["dk"])) < 1e-12
    wrong = {**flat, **{n: x[n].detach().repeat(1, 1, 3, 1) for n in ("q", "k")}}  # head j reads j % H
    assert max_rel_err(run_delta_with_grads(delta_rule, wrong)["o"], a["o"]) > 1e-3


def test_negative_control_decay_averaged_over_keys_is_caught(monkeypatch):
    """A chunk scan that decays the state by the mean of the key channels' decays (a scalar gate) fails."""
    x = make_delta_inputs(True, T=130, per_key=True)
    ref = _ref(x)
    monkeypatch.setattr(chunk_mod, "_as_state_factor",
                        lambda d: d[..., None, None] if d.dim() == 3 else d.mean(-1, keepdim=True)[..., None])
    with pytest.raises(AssertionError):
        assert_close(run_delta_with_grads(delta_rule, x, backend="torch"), ref, TOL[torch.float64])

