"""What autograd keeps: the shared measure of the custom-op tests (linear and delta rule)."""
from __future__ import annotations

import torch


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps while fn() runs (storages stay alive: the graph holds them)."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def as_fake(xs, fake_mode):
    """The inputs as fake tensors of `fake_mode` that require grad (None stays None)."""
    return [None if x is None else fake_mode.from_tensor(x.detach()).requires_grad_(True) for x in xs]
