"""How SP collectives stay consistent across ranks under autograd: join tokens and checkpoint replay.

Two rules make a collective inside an autograd graph safe on every rank:

* **Every rank joins.** Whether a rank runs a collective's backward must not depend on what requires grad on that
  rank (a frozen projection, or a rank that holds no trainable initial state, would otherwise skip the backward
  collective its peers block in). Every collective node of an SP call therefore takes a `join_token()`: a zero-size
  tensor that requires grad whenever grad mode is on, so the node is in the graph on every rank alike.
* **One order.** Collectives must run in the same order on every rank, in backward too. A node that must run its
  backward before another's hands it a token (a zero-size output consumed by the later node), so the order is a
  data dependency, not an accident of which outputs happen to be used on which rank.

Activation checkpointing recomputes a block's forward during backward. The exchange of linear-attention states is
small but a collective: re-issuing it in the recompute would cost a second round of communication and, with frozen
inputs or uneven recompute, could reorder collectives between ranks. `checkpoint_contexts` (for
`torch.utils.checkpoint`'s `context_fn`) records each exchange result of the checkpointed forward on a tape and
replays it in the recompute, which then communicates nothing. The tape holds only the exchange results (the
entering states of the held segments and final states: O(1) in the world size); softmax K,V gathers are not
recorded (they are sequence-sized, and re-gathering them is the point of checkpointing).
"""
from __future__ import annotations

import contextlib

import torch


def join_token() -> torch.Tensor:
    """A zero-size tensor that requires grad whenever grad mode is on (see the module docstring)."""
    return torch.empty(0, requires_grad=torch.is_grad_enabled())


def token_like(x: torch.Tensor) -> torch.Tensor:
    """A zero-size output token, handed from one collective node to the next to fix their backward order."""
    return x.new_empty(0)


class _Depend(torch.autograd.Function):
    # x, token -> x; backward hands the token an (empty) gradient, so the node that made it runs its backward
    @staticmethod
    def forward(ctx, x, token):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_empty(0)


def depend(x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """x, with the collective that produced `token` in its backward graph even when x does not use its result (a
    rank whose held segments all enter with a zero state must still join that collective's backward)."""
    return _Depend.apply(x, token)


class _Tape:
    def __init__(self):
        self.items: list = []
        self.pos = 0


_ACTIVE: list[tuple[str, _Tape]] = []  # stack of ("record" | "replay", tape)


@contextlib.contextmanager
def _mode(mode: str, tape: _Tape):
    if mode == "replay":
        tape.pos = 0
    _ACTIVE.append((mode, tape))
    try:
        yield
    finally:
        _ACTIVE.pop()


def checkpoint_contexts():
    """`context_fn` for `torch.utils.checkpoint(..., use_reentrant=False)`: exchanges of the checkpointed forward
    are recorded and replayed (not re-communicated) in its recompute."""
    tape = _Tape()
    return _mode("record", tape), _mode("replay", tape)


def replaying() -> bool:
    """True inside a checkpoint recompute: exchanges return their recorded results and communicate nothing."""
    return bool(_ACTIVE) and _ACTIVE[-1][0] == "replay"


def replayed(compute):
    """Run `compute()` (which communicates) and record its result, or return the recorded result in a replay."""
    if not _ACTIVE:
        return compute()
    mode, tape = _ACTIVE[-1]
    if mode == "replay":
        assert tape.pos < len(tape.items), "checkpoint recompute ran more exchanges than the forward recorded"
        out = tape.items[tape.pos]
        tape.pos += 1
        return out
    out = compute()
    tape.items.append(tuple(x.detach() for x in out) if isinstance(out, tuple) else out.detach())
    return out


__all__ = ["join_token", "token_like", "depend", "checkpoint_contexts", "replaying", "replayed"]
