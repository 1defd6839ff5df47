"""Input factory and comparison helpers for linear-attention tests (shared by every backend's tests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

DECAY_FORMS = ("none", "head", "scalar", "key")


def make_decay(form: str, B: int, T: int, H: int, K: int, dtype, gen, strength: float = 1.0):
    """Log-decay g <= 0 of the requested form; strength scales how fast states forget."""
    if form == "none":
        return None
    if form == "head":
        return -strength * (0.05 + torch.rand(H, generator=gen, dtype=torch.float64)).to(dtype)
    shape = (B, T, H) if form == "scalar" else (B, T, H, K)
    return (strength * F.logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64) + 2.0)).to(dtype)


def make_inputs(form, B=2, T=45, H=2, K=8, V=6, dtype=torch.float64, seed=0, init=True, n_seq=None,
                strength=1.0, requires_grad=True):
    """q, k, v, g, initial_state (initial_state has n_seq rows when given, else B)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, d, generator=gen, dtype=torch.float64).to(dtype) for d in (K, K, V))
    g = make_decay(form, B, T, H, K, dtype, gen, strength)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s0 = torch.randn(n_seq or B, H, K, V, generator=gen, dtype=torch.float64).to(acc) if init else None
    tensors = [q, k, v, g, s0]
    if requires_grad:
        for x in tensors:
            if x is not None:
                x.requires_grad_(True)
    return tensors


def run_with_grads(fn, q, k, v, g, s0, seed=1, **kwargs):
    """Run fn(q, k, v, g, initial_state=s0, output_final_state=True, **kwargs) and return output, final state and
    the gradients of a loss that weights every output and state entry differently (so a swapped or dropped term
    cannot cancel out)."""
    o, s = fn(q, k, v, g, initial_state=s0, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    w_o = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    w_s = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)
    loss = (o.float() * w_o.float()).sum() + (s.float() * w_s.float()).sum()
    inputs = [x for x in (q, k, v, g, s0) if x is not None]
    grads = torch.autograd.grad(loss, inputs)
    names = [n for n, x in zip("q k v g initial_state".split(), (q, k, v, g, s0)) if x is not None]
    return {"o": o.detach(), "final_state": s.detach(), **{f"d{n}": gr for n, gr in zip(names, grads)}}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (a norm-relative error, robust to entries near zero)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_close(res: dict, ref: dict, tol: float, what: str = ""):
    assert res.keys() == ref.keys(), (res.keys(), ref.keys())
    for key in ref:
        err = max_rel_err(res[key], ref[key])
        assert err <= tol, f"{what} {key}: relative error {err:.3e} > {tol:.1e}"
