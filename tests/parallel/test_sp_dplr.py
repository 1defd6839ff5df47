"""sp_dplr_delta_rule: every method x layout x packing x W (emulated, and on real gloo ranks) equals the naive
fp64 DPLR recurrence in outputs, final states and the gradients of every input."""
import pytest
import torch

from lsp.parallel import DELTA_METHODS, SPContext, sp_dplr_delta_rule, spawn
from lsp.parallel import affine as affine_mod

from . import dplr_cases
from .cases import max_rel_err
from .dplr_cases import dplr_reference, make_dplr_case, run_sp_dplr

LAYOUTS = ("contiguous", "zigzag")


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_matrix_fp64(W, varlen):
    # fp64 chunked vs fp64 recurrence: only rounding differs (~1e-15 relative); 1e-10 leaves room for T = 128
    case = make_dplr_case(W, varlen)
    ref = dplr_reference(case)
    for layout in LAYOUTS:
        for method in DELTA_METHODS:
            err = max_rel_err(run_sp_dplr(case, SPContext(emulate=W, layout=layout), method), ref)
            assert max(err.values()) < 1e-10, (W, varlen, layout, method, err)


def test_segments_longer_than_a_chunk():
    """Zigzag segments of 80 tokens cross a chunk edge (C = 64), with documents starting inside them."""
    case = make_dplr_case(2, True, T_per_rank=160, H=1, K=4, V=3)
    ref = dplr_reference(case)
    for method in DELTA_METHODS:
        err = max_rel_err(run_sp_dplr(case, SPContext(emulate=2, layout="zigzag"), method), ref)
        assert max(err.values()) < 1e-10, (method, err)


def test_fp32_close_to_fp64_reference():
    case = make_dplr_case(3, True, dtype=torch.float32)
    ref = dplr_reference({n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                          for n, t in case.items()})
    err = max_rel_err(run_sp_dplr(case, SPContext(emulate=3, layout="zigzag"), "allscan"), ref)
    assert max(err.values()) < 1e-4, err


@pytest.mark.parametrize("method", DELTA_METHODS)
def test_negative_control_transposed_map_fails(method, monkeypatch):
    """Composing the prefix with M_iᵀ instead of M_i (a wrong prefix) must break the comparison."""
    case = make_dplr_case(3, False)
    ref = dplr_reference(case)
    flipped = staticmethod(lambda A, X, transpose=False: (A if transpose else A.transpose(-1, -2)) @ X)
    monkeypatch.setattr(affine_mod.DenseMaps, "apply", flipped)
    err = max_rel_err(run_sp_dplr(case, SPContext(emulate=3, layout="zigzag"), method), ref)
    assert err["o"] > 1e-3


@pytest.mark.parametrize("kwargs,match", [({"method": "tree"}, "method must be one of"),
                                          ({"backend": "naive"}, "backend must be 'auto', 'torch' or 'triton'"),
                                          ({"backend": "trton"}, r"must be one of \('auto', 'torch', 'triton'")])
def test_bad_arguments_name_the_argument(kwargs, match):
    case = make_dplr_case(2, False)
    sp = SPContext(emulate=2)
    with pytest.raises(ValueError, match=match):
        sp_dplr_delta_rule(*(sp.shard(case[n]) for n in dplr_cases.NAMES[:-1]), sp=sp, **kwargs)


def test_wrong_shape_of_a_names_it():
    case = make_dplr_case(2, False)
    sp = SPContext(emulate=2)
    x = [sp.shard(case[n]) for n in dplr_cases.NAMES[:-1]]
    x[3] = x[3][..., :-1]
    with pytest.raises(ValueError, match=r"^a must be a floating tensor of q's shape"):
        sp_dplr_delta_rule(*x, sp=sp)


def _check_gloo(W, *cases):
    for errors in spawn(dplr_cases.gloo_dplr, W, *cases, timeout_s=240):
        bad = {k: e for k, e in errors.items() if not e < 1e-10}
        assert errors and not bad, bad


def test_gloo_dplr_zigzag_packed():
    """Two real ranks, zigzag, documents crossing ranks and segments, every method."""
    _check_gloo(2, (("zigzag", True),))


@pytest.mark.slow
@pytest.mark.parametrize("W", [2, 3])
def test_gloo_dplr_every_layout(W):
    _check_gloo(W)
