"""Input factory for delta-rule tests: unit-norm keys (as the layer makes them), beta in (0, 2), g <= 0."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear_cases import max_rel_err

NAMES = ("q", "k", "v", "beta", "g", "initial_state")


def make_delta_inputs(gated=True, B=2, T=45, H=2, K=8, V=6, dtype=torch.float64, seed=0, init=True, n_seq=None,
                      strength=1.0, requires_grad=True, per_key=False, groups=1):
    """dict of q, k, v, beta, g (None when not gated) and initial_state (n_seq rows when given, else B; None when
    not init). g is one log-decay per head, or per key channel with `per_key` (KDA); with `groups` G, q and k have
    H heads and v, beta, g and the state HV = G·H (grouped value heads)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    HV = H * groups
    gate_shape = (B, T, HV, K) if per_key else (B, T, HV)
    x = {"q": rnd(B, T, H, K), "k": F.normalize(rnd(B, T, H, K), dim=-1), "v": rnd(B, T, HV, V),
         "beta": 2 * torch.sigmoid(rnd(B, T, HV)),
         "g": strength * F.logsigmoid(rnd(*gate_shape) + 2.0) if gated else None,
         "initial_state": rnd(n_seq or B, HV, K, V) if init else None}
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = {n: None if t is None else t.to(acc if n == "initial_state" else dtype) for n, t in x.items()}
    for t in x.values():
        if t is not None and requires_grad:
            t.requires_grad_(True)
    return x


def detached64(x: dict) -> dict:
    return {n: None if t is None else t.detach().double().requires_grad_(True) for n, t in x.items()}


def run_delta_with_grads(fn, x: dict, seed=1, **kwargs):
    """fn(q, k, v, beta, g, initial_state=..., output_final_state=True, **kwargs): output, final state and the
    gradients of every input under a loss that weights every output and state entry differently."""
    o, s = fn(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"], output_final_state=True,
              **kwargs)
    gen = torch.Generator().manual_seed(seed)
    w_o, w_s = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (o, s))
    loss = (o.double() * w_o).sum() + (s.double() * w_s).sum()
    names = [n for n in NAMES if x[n] is not None and x[n].requires_grad]
    grads = torch.autograd.grad(loss, [x[n] for n in names])
    return {"o": o.detach(), "final_state": s.detach(), **{f"d{n}": gr for n, gr in zip(names, grads)}}


__all__ = ["make_delta_inputs", "detached64", "run_delta_with_grads", "max_rel_err"]
