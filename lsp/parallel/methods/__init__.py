"""The SP methods of the linear layers: one registry, and the two autograd nodes every method runs in.

Each module of this folder is one method (allgather.py: LASP-2; chain.py: ZeCO All-Scan and the LASP-1 ring) and
registers itself when the folder is imported. A method is registered once (`register_method`) with

* `handle(sp, plan, family, tag, scan_blocks)`: an object with four steps, each over the algebra of
  lsp.parallel.affine (so it serves every linear family):
    - `launch(S, P)`: start the exchange of the held segments' maps (S [R, L, B, H, K, V], P the family's part);
    - `finish() -> E`: the entering states of the held segments [R, L, B, H, K, V];
    - `launch_backward(gE, E, P)`: start the reverse exchange of the direct gradients of E;
    - `input_grads() -> (∂S, ∂P)`.
* `cost(world_size, state_bytes, map_bytes, t_overlap, hw, layout, scan_blocks) -> (exposed s, bytes per GPU)`:
  one pass (forward or backward) of one layer, what lsp.plan.costmodel and the planner price it with; map_bytes is
  the family's A as it travels (a decay vector, or K × K), t_overlap the local work it can hide behind,
  scan_blocks None: the method's best.
* `label` (for tables) and `blocks` (whether `scan_blocks` means something to it).

Every name the config may choose (`lsp.names.SP_METHODS`) must be registered with both parts: `check_registered`
raises at import otherwise, and `sp_method` raises on an unknown name, so nothing falls through to a default.

The nodes: Launch starts the exchange and Finish completes it, two autograd nodes so the local zero-state output is
computed while the exchange is in flight (and its gradient while the reverse exchange is). Every node takes a join
token and hands one on (lsp.parallel.collectives); a checkpoint recompute launches nothing and Finish replays the
recorded result.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

import torch

from lsp.names import SP_METHODS

from ..collectives import replayed, replaying, token_like
from ..registry import MethodRegistry

SCAN_BLOCK_CHOICES = (1, 2, 4, 8, 16, 32, 64)   # the block counts a method's best is chosen among


@dataclass(frozen=True)
class SPMethod:
    name: str
    label: str
    handle: Callable
    cost: Callable
    blocks: bool = False

    def best_blocks(self, world_size: int, state_bytes: float, map_bytes: float, t_overlap: float, hw,
                    layout: str) -> int:
        """The block count (of SCAN_BLOCK_CHOICES) with the least exposed time; the smallest on a tie."""
        times = {nb: self.cost(world_size, state_bytes, map_bytes, t_overlap, hw, layout, nb)[0]
                 for nb in SCAN_BLOCK_CHOICES}
        return min(nb for nb, t in times.items() if t <= min(times.values()) * (1 + 1e-9))


LINEAR = MethodRegistry("linear", SP_METHODS)   # the linear layers' methods (lsp.names.SP_METHODS: the built-ins)


def register_method(name: str, *, handle: Callable, cost: Callable, label: str | None = None,
                    blocks: bool = False) -> SPMethod:
    """Register a linear-layer SP method: its implementation and its cost formula (both required)."""
    return LINEAR.register(SPMethod(name, label or name, handle, cost, blocks))


def unregister_method(name: str) -> None:
    """Remove a registered method (a test's toy method after the test)."""
    LINEAR.unregister(name)


def sp_method(name: str) -> SPMethod:
    """The registered method `name`; an unknown name raises one line naming the choices."""
    return LINEAR.get(name)


def sp_methods() -> tuple[str, ...]:
    """The registered method names (the built-ins first, in `lsp.names.SP_METHODS` order)."""
    return LINEAR.names()


def check_registered(names=None) -> None:
    """Every name the config accepts (lsp.names.SP_METHODS) has an implementation and a cost formula, or this
    raises."""
    LINEAR.check_registered(names)


# ---------------------------------------------------------------------------------------------- the two nodes


class Launch(torch.autograd.Function):
    # S: [R, L, B, H, K, V]; P: the family's part or None; token: join token -> token (orders the finish node);
    # h: the method's handle. A checkpoint recompute launches nothing: Finish replays the recorded result.
    @staticmethod
    def forward(ctx, S, P, token, h):
        ctx.h = h
        if not replaying():
            h.launch(S, P)
        return token_like(S)

    @staticmethod
    def backward(ctx, _):
        return (*ctx.h.input_grads(), None, None)


class Finish(torch.autograd.Function):
    # token, P (kept for backward) -> E: [R, L, B, H, K, V] entering states of the held segments, token. Only the
    # held segments' E and P are saved; backward starts the reverse exchange, Launch's backward finishes it.
    @staticmethod
    def forward(ctx, token, P, h):
        ctx.set_materialize_grads(False)
        ctx.h = h
        E = replayed(h.finish)
        ctx.save_for_backward(E, P)
        return E, token_like(E)

    @staticmethod
    def backward(ctx, gE, _):
        E, P = ctx.saved_tensors
        ctx.h.launch_backward(torch.zeros_like(E) if gE is None else gE.contiguous(), E, P)
        return E.new_empty(0), None, None


def exchange(S, P, token, sp, plan, method: str, scan_blocks: int, family, tag: str):
    """Start the exchange; returns a function that finishes it and yields (E [R, L, B, H, K, V], token).

    S: [R, L, B, H, K, V] local states; P: [R, L, B, H, ...] the family's map part (lsp.parallel.affine) or None;
    token: a join token; tag: the comm-accounting tag of this call's messages.
    """
    h = sp_method(method).handle(sp, plan, family, tag, scan_blocks)
    launched = Launch.apply(S, P, token, h)
    return lambda: Finish.apply(launched, P, h)


# every module of this folder is a method that registers itself: adding a method is adding its file here
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SPMethod", "LINEAR", "register_method", "unregister_method", "sp_method", "sp_methods", "check_registered",
           "exchange", "SCAN_BLOCK_CHOICES"]
