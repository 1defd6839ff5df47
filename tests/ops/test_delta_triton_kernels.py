"""The delta rule's Triton forward kernels one by one, and what the Triton op costs besides its math.

- The UT inverse (`_ut_inverse_kernel`: 16-row sub-blocks, forward substitution on the diagonal, block recurrence
  below it) against fp64 `torch.linalg.solve_triangular` on chunks with strong coupling (beta up to 2, unit keys all
  near one direction, so A has entries up to ~2 and T has entries far from the identity). fp64 products: the error
  is rounding only, 1e-12 relative. Control: the inverse of the diagonal blocks only (what a kernel that forgot the
  block recurrence would give) must be rejected by the same assertion.
- Launches per call (counted at the interpreter's launch hook) are the same for 1 and 3 chunks and for packed
  sequences: forward 4 (inverse, apply, scan, output), backward 8 (inverse, apply and scan recomputed, the output's
  gradients, the reverse scan, the W, dA and key kernels).
- Saved bytes: the op keeps only its inputs (q, k, v, beta, g, initial state) and recomputes the rest in backward,
  so saved / (q, k, v, beta, g bytes) is 1 plus the initial state; the chunked torch path keeps its chunk tensors
  (the control: the same measurement sees more than 1.5x there).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from lsp.ops import delta_rule  # noqa: E402
from lsp.ops.delta import chunk as chunk_mod  # noqa: E402
from lsp.ops.delta.triton_chunk import ut_transform  # noqa: E402
from lsp.plan.measure import saved_bytes  # noqa: E402

from .delta_cases import make_delta_inputs  # noqa: E402
from .linear_cases import max_rel_err  # noqa: E402
from .triton_interp import interpreter_bf16_dot  # noqa: E402,F401

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
C, S = 64, 16


def _coupled_chunks(NC=2, K=16, V=8, gated=True):
    # [1, 2, NC, C, *] fp64 chunks: keys near one direction (|k_i · k_j| ~ 1), beta in (0, 2)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(K, generator=gen, dtype=torch.float64)
    k = torch.nn.functional.normalize(base + 0.5 * torch.randn(1, 2, NC, C, K, generator=gen, dtype=torch.float64),
                                      dim=-1)
    v = torch.randn(1, 2, NC, C, V, generator=gen, dtype=torch.float64)
    beta = 2 * torch.rand(1, 2, NC, C, generator=gen, dtype=torch.float64)
    g = -0.1 * torch.rand(1, 2, NC, C, generator=gen, dtype=torch.float64) if gated else None
    return k, v, beta, g


def _reference_inverse(k, beta, g):
    # (I + A)^-1 in fp64, A_ij = beta_i exp(G_i - G_j) k_i·k_j on j < i
    G = torch.zeros_like(beta) if g is None else g.cumsum(-1)
    A = beta[..., None] * (k @ k.transpose(-1, -2)) * (G[..., :, None] - G[..., None, :]).exp()
    A = A.tril(-1) + torch.eye(C, dtype=A.dtype)
    return torch.linalg.solve_triangular(A, torch.eye(C, dtype=A.dtype).expand_as(A), upper=False)


def _diagonal_blocks_only(T):
    mask = torch.block_diag(*[torch.ones(S, S, dtype=torch.bool)] * (C // S))
    return torch.where(mask, T, 0.0)


@pytest.mark.parametrize("gated", [True, False])
def test_ut_inverse_and_apply_match_fp64(gated):
    k, v, beta, g = _coupled_chunks(gated=gated)
    ref = _reference_inverse(k, beta, g)
    assert (ref - torch.eye(C, dtype=ref.dtype)).abs().max() > 0.5, "the case must couple the sub-blocks"
    Tinv, U, Wk, Kd = ut_transform(*(None if x is None else x.to(DEVICE).contiguous() for x in (k, v, beta, g)))
    assert max_rel_err(Tinv.cpu(), ref) < 1e-12
    assert max_rel_err(_diagonal_blocks_only(Tinv.cpu()), ref) > 1e-3       # control: no block recurrence
    G = torch.zeros_like(beta) if g is None else g.cumsum(-1)
    assert max_rel_err(U.cpu(), ref @ (beta[..., None] * v)) < 1e-12
    assert max_rel_err(Wk.cpu(), ref @ ((beta * G.exp())[..., None] * k)) < 1e-12
    assert max_rel_err(Kd.cpu(), (G[..., -1:] - G).exp()[..., None] * k) < 1e-12


@pytest.fixture
def launches(monkeypatch):
    """A list that receives the name of every kernel launched while the test runs."""
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    names = []
    cls = JITFunction if torch.cuda.is_available() else interpreter.InterpretedFunction
    original = cls.run

    def run(self, *args, **kwargs):
        names.append(getattr(self, "fn", self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    return names


def _inputs(T, backward, cu=None, dtype=torch.float32, H=1, K=16):
    x = make_delta_inputs(True, B=1, T=T, H=H, K=K, V=K, dtype=dtype, n_seq=None if cu is None else len(cu) - 1,
                          requires_grad=backward)
    return {n: None if t is None else t.detach().to(DEVICE).requires_grad_(backward) for n, t in x.items()}


def _forward(x, cu=None):
    return delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"],
                      output_final_state=True, backend="triton", cu_seqlens=None if cu is None else cu.to(DEVICE))


def _call(T, backward, cu=None):
    o, s = _forward(_inputs(T, backward, cu), cu)
    if backward:
        (o.float().sum() + s.sum()).backward()


def test_launches_do_not_grow_with_T(launches):
    counts = {}
    for T in (64, 192):
        for backward in (False, True):
            launches.clear()
            _call(T, backward)
            counts[T, backward] = len(launches)
    assert counts[64, False] == counts[192, False] == 4, counts
    assert counts[64, True] == counts[192, True] == 12, counts
    launches.clear()
    _call(200, True, cu=torch.tensor([0, 10, 10, 80, 150, 200], dtype=torch.int32))
    assert len(launches) == 12, launches


def _input_bytes(x):
    return sum(x[n].numel() * x[n].element_size() for n in ("q", "k", "v", "beta", "g"))


@pytest.mark.parametrize("T", [64, 130])
def test_saved_bytes_are_the_inputs(T):
    x = _inputs(T, True, dtype=torch.bfloat16, H=2, K=32)
    saved = saved_bytes(lambda: _forward(x))
    assert saved == _input_bytes(x) + x["initial_state"].numel() * 4, (saved, _input_bytes(x))


@pytest.mark.parametrize("per_key", [False, True])
def test_grouped_value_heads_keep_q_and_k_at_their_heads(per_key):
    """HV = 2·H value heads: the kernels read q/k head j // G, so the op keeps q and k at their H heads (saved = the
    inputs' bytes), where q, k repeated per value head before the op (as before) kept them at HV heads: the same
    measurement sees the difference, G − 1 = 1 more copy of q and k."""
    x = make_delta_inputs(True, B=1, T=64, H=1, K=32, V=32, dtype=torch.bfloat16, groups=2, per_key=per_key)
    x = {n: t.detach().to(DEVICE).requires_grad_() for n, t in x.items()}
    qk = sum(x[n].numel() * x[n].element_size() for n in ("q", "k"))
    saved = saved_bytes(lambda: _forward(x))
    assert saved == _input_bytes(x) + x["initial_state"].numel() * 4, (saved, _input_bytes(x))
    repeated = {**x, **{n: x[n].detach().repeat_interleave(2, dim=2).requires_grad_() for n in ("q", "k")}}
    assert saved_bytes(lambda: _forward(repeated)) == saved + qk


def test_saved_bytes_control_torch_path_keeps_more():
    # the measurement sees the chunk tensors of the chunked torch path (its scan in Triton): far above 1.5x
    x = _inputs(130, True, dtype=torch.bfloat16, H=2, K=32)
    saved = saved_bytes(lambda: chunk_mod.chunk_forward(x["q"], x["k"], x["v"], x["beta"], x["g"], 32 ** -0.5,
                                                        x["initial_state"], True, scan_backend="triton"))
    assert saved > 1.5 * _input_bytes(x), saved


@pytest.mark.slow
def test_saved_bytes_at_T8192_H4_d128_bf16():
    """The budget's shape (saved <= 1.5x the bytes of q, k, v, beta, g): measured 1.000 (~170 s interpreted)."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, d = 1, 8192, 4, 128
    q, k, v = (torch.randn(B, T, H, d, generator=gen).bfloat16().to(DEVICE).requires_grad_() for _ in range(3))
    beta = torch.rand(B, T, H, generator=gen).bfloat16().to(DEVICE).requires_grad_()
    g = (-0.1 * torch.rand(B, T, H, generator=gen)).bfloat16().to(DEVICE).requires_grad_()
    saved = saved_bytes(lambda: delta_rule(q, k, v, beta, g, output_final_state=True, backend="triton"))
    assert saved == sum(x.numel() * x.element_size() for x in (q, k, v, beta, g)), saved
