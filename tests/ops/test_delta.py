"""The chunked (WY/UT) delta rule against the step-by-step naive recurrence, gradients of every input included.

Tolerances (norm-relative, max|a-b| / max|b|):
- fp64: 1e-9. Both paths compute the same sums in a different order plus one 64x64 unit-triangular solve per
  chunk; with unit-norm keys and beta in (0, 2) the solve is well conditioned, and measured errors are ~1e-14.
- fp32 vs the fp64 reference: 1e-4 (measured ~1e-6); a wrong term (no UT solve, a perturbed beta, a dropped
  initial state) gives errors of O(1e-1) and fails (see the negative controls).
"""
from __future__ import annotations

import pytest
import torch

from lsp.ops import delta_rule
from lsp.ops.delta import chunk_output, enter_sequences, prepare_chunks, sequence_maps

from .delta_cases import detached64, make_delta_inputs, max_rel_err, run_delta_with_grads
from .linear_cases import assert_close

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _ref(x, **kw):
    return run_delta_with_grads(delta_rule, detached64(x), backend="naive", **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T,init", [(64, False), (45, True), (130, True), (1, True)])
def test_torch_matches_naive(gated, T, init, dtype):
    x = make_delta_inputs(gated, T=T, dtype=dtype, init=init)
    res = run_delta_with_grads(delta_rule, x, backend="torch")
    assert_close(res, _ref(x), TOL[dtype], f"gated={gated} T={T}")
    assert res["o"].dtype == dtype and res["final_state"].dtype == (torch.float64 if dtype == torch.float64
                                                                    else torch.float32)


@pytest.mark.parametrize("gated", [False, True])
def test_varlen_matches_naive(gated):
    # boundaries inside a chunk, on a chunk edge (64), an empty sequence, and a sequence of length 1
    cu = torch.tensor([0, 10, 10, 64, 65, 150], dtype=torch.int32)
    x = make_delta_inputs(gated, B=1, T=150, n_seq=5)
    res = run_delta_with_grads(delta_rule, x, backend="torch", cu_seqlens=cu)
    assert_close(res, _ref(x, cu_seqlens=cu), TOL[torch.float64], f"varlen gated={gated}")


def test_varlen_equals_separate_runs():
    """Packing is exactly running each sequence on its own: no state leaks across a boundary."""
    cu = [0, 37, 100]
    x = make_delta_inputs(True, B=1, T=100, n_seq=2, requires_grad=False)
    o, s = delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"],
                      output_final_state=True, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        o_n, s_n = delta_rule(*(x[m][:, a:b] for m in ("q", "k", "v", "beta", "g")),
                              initial_state=x["initial_state"][n : n + 1], output_final_state=True)
        assert max_rel_err(o[:, a:b], o_n) < 1e-12
        assert max_rel_err(s[n : n + 1], s_n) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_state_chaining(backend):
    """Two halves, passing the first half's final state as the second's initial state, equal one run."""
    x = make_delta_inputs(True, T=90, requires_grad=False)
    seq = [x[m] for m in ("q", "k", "v", "beta", "g")]
    o, s = delta_rule(*seq, initial_state=x["initial_state"], output_final_state=True, backend=backend)
    o1, s1 = delta_rule(*(t[:, :41] for t in seq), initial_state=x["initial_state"], output_final_state=True,
                        backend=backend)
    o2, s2 = delta_rule(*(t[:, 41:] for t in seq), initial_state=s1, output_final_state=True, backend=backend)
    assert max_rel_err(torch.cat([o1, o2], 1), o) < 1e-12
    assert max_rel_err(s2, s) < 1e-12


def test_sequence_maps_are_the_affine_state_map():
    """[M | S_loc] from `sequence_maps`: entering with any S_in ends in M S_in + S_loc (the naive final state)."""
    # K = 32 and a weak decay keep M well away from zero over a 90-token document (it crosses a chunk edge)
    cu = torch.tensor([0, 90, 91, 110], dtype=torch.int32)
    x = make_delta_inputs(True, B=1, T=110, K=32, n_seq=3, strength=0.01, requires_grad=False)
    maps = sequence_maps(prepare_chunks(x["k"], x["v"], x["beta"], x["g"], cu), x["initial_state"])[1]
    K = x["k"].shape[-1]
    s_in = torch.randn_like(x["initial_state"])
    _, ref = delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"] + s_in,
                        output_final_state=True, cu_seqlens=cu, backend="naive")
    _, s_loc = delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"],
                          output_final_state=True, cu_seqlens=cu, backend="naive")
    # the map is affine in the entering state: final(h0 + s_in) = final(h0) + M s_in
    assert max_rel_err(maps[..., K:], s_loc) < 1e-12
    assert max_rel_err(maps[..., :K] @ s_in + maps[..., K:], ref) < 1e-12
    assert max_rel_err(maps[..., :K].transpose(-1, -2) @ s_in + maps[..., K:], ref) > 1e-3  # transposed map: wrong


def test_enter_sequences_equals_a_run_from_the_shifted_initial_state():
    """Outputs from the chunk prefix maps entered with init + X equal a full run from initial_state = init + X."""
    cu = torch.tensor([0, 90, 91, 200], dtype=torch.int32)
    x = make_delta_inputs(True, B=1, T=200, K=16, n_seq=3, strength=0.05, requires_grad=False)
    extra = torch.randn_like(x["initial_state"])
    chunks = prepare_chunks(x["k"], x["v"], x["beta"], x["g"], cu)
    entering, final = enter_sequences(chunks, *sequence_maps(chunks, x["initial_state"]), extra)
    o = chunk_output(x["q"], chunks, entering, 0.25)
    o_ref, s_ref = delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], scale=0.25, output_final_state=True,
                              initial_state=x["initial_state"] + extra, cu_seqlens=cu, backend="naive")
    assert max_rel_err(o, o_ref) < 1e-12 and max_rel_err(final, s_ref) < 1e-12
    o_wrong = chunk_output(x["q"], chunks, enter_sequences(chunks, *sequence_maps(chunks, x["initial_state"]),
                                                           torch.roll(extra, 1, 0))[0], 0.25)
    assert max_rel_err(o_wrong, o_ref) > 1e-3  # X of the wrong sequence: caught


def test_strong_decay_is_stable_in_fp32():
    """Cumulative log-decays reach about -4000 inside a chunk; nothing may overflow (no exp of large positives)."""
    x = make_delta_inputs(True, T=128, dtype=torch.float32, strength=60.0)
    res = run_delta_with_grads(delta_rule, x, backend="torch")
    assert all(torch.isfinite(t).all() for t in res.values())
    assert_close(res, _ref(x), TOL[torch.float32], "strong decay")


def test_numerics_ignore_autocast():
    """An enclosing bf16 autocast changes nothing: the state math stays in fp32."""
    x = make_delta_inputs(True, T=70, dtype=torch.float32, requires_grad=False)
    args = [x[m] for m in ("q", "k", "v", "beta", "g")]
    o, s = delta_rule(*args, initial_state=x["initial_state"], output_final_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_ac, s_ac = delta_rule(*args, initial_state=x["initial_state"], output_final_state=True)
    assert o_ac.dtype == torch.float32 and torch.equal(o_ac, o) and torch.equal(s_ac, s)


def test_bf16_inputs():
    x = make_delta_inputs(True, T=70, dtype=torch.bfloat16)
    res = run_delta_with_grads(delta_rule, x)
    assert res["o"].dtype == torch.bfloat16 and res["final_state"].dtype == torch.float32
    # bf16 has an 8-bit mantissa: the input and output rounding alone is 2^-8 ~ 4e-3 relative
    assert max_rel_err(res["o"], _ref(x)["o"]) < 2e-2


@pytest.mark.parametrize("bad,match", [
    ({"beta": torch.zeros(2, 45, 3)}, "beta must be"),
    ({"g": torch.zeros(2, 45, 2, 5)}, r"g \(log-decay\) must be None, \[B, T, HV\]=\[2, 45, 2\] or \[B, T, HV, K\]"),
    ({"v": torch.zeros(2, 45, 3, 6)}, r"v's heads HV=3 must be a multiple G·H of the H=2 heads of q and k"),
    ({"beta": torch.zeros(2, 45, 2, 1)}, r"beta must be a floating tensor \[B, T, HV\]"),
    ({"g": torch.zeros(2)}, "g \\(log-decay\\)"),
    ({"initial_state": torch.zeros(2, 2, 8, 5)}, "initial_state must have shape"),
])
def test_bad_arguments_name_the_argument(bad, match):
    x = {**make_delta_inputs(True, requires_grad=False, dtype=torch.float32), **bad}
    with pytest.raises(ValueError, match=match):
        delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"])


def test_unknown_backend_is_rejected():
    x = make_delta_inputs(False, requires_grad=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        delta_rule(x["q"], x["k"], x["v"], x["beta"], backend="tree")


# ---- negative controls: the comparison above must catch wrong math ---------------------------------------------

def test_negative_control_skipped_ut_transform_is_caught(monkeypatch):
    """Without the triangular solve (T = I: each token ignores the earlier writes of its chunk) the check fails."""
    x = make_delta_inputs(True, T=80)
    ref = _ref(x)
    monkeypatch.setattr(torch.linalg, "solve_triangular", lambda A, B, **kw: B)
    with pytest.raises(AssertionError):
        assert_close(run_delta_with_grads(delta_rule, x, backend="torch"), ref, TOL[torch.float64])


def test_negative_control_perturbed_beta_and_dropped_state_are_caught():
    x = make_delta_inputs(True, T=80)
    ref = _ref(x)
    wrong = run_delta_with_grads(delta_rule, {**x, "beta": 0.9 * x["beta"]}, backend="torch")
    with pytest.raises(AssertionError):
        assert_close(wrong, {**ref}, TOL[torch.float64])
    o, _ = delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"])
    assert max_rel_err(o, ref["o"]) > 1e-3
