"""Packed-document boundaries of a batch: its host list next to its device copy, and the one cache of what is derived.

cu_seqlens (int32 [N + 1]) reaches every layer of a model as the same device tensor. What the layers derive from it
(the chunk layout of the linear ops, the document pieces of softmax attention, the SP segment plan) needs the
boundaries on the host. The loader knows them there: `device_boundaries` (or `remember`, for a device tensor made
elsewhere) records the host list with the device copy, so no layer reads the tensor back (no device sync). A tensor
nobody recorded is read once, on first use, never again per layer.

`boundaries(cu)` returns the batch's `Boundaries`: the host list and `derived(key, build)`, the one cache of every
plan derived from it, keyed by the tensor's identity and version (written in place -> rebuilt), and dropped with
the tensor (only the most recent CACHE_SIZE tensors are kept).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch

CACHE_SIZE = 8   # distinct boundary tensors alive at once: one per batch in flight (SP: + local views)


@dataclass
class Boundaries:
    """The host list of one cu_seqlens tensor and everything derived from it (built once)."""

    host: list[int]
    _derived: dict = field(default_factory=dict, repr=False)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(start, end) per document."""
        return list(zip(self.host[:-1], self.host[1:]))

    def derived(self, key, build):
        """build() once per key for these boundaries (a chunk layout, a segment plan, softmax pieces)."""
        with _lock:
            if key in self._derived:
                return self._derived[key]
        value = build()
        with _lock:
            return self._derived.setdefault(key, value)


_entries: list = []   # [(weakref to the tensor, its _version, Boundaries)], most recent last
_lock = threading.RLock()   # the All-Scan helper thread runs local passes too


def _find(cu: torch.Tensor) -> Boundaries | None:
    with _lock:
        _entries[:] = [e for e in _entries if e[0]() is not None]
        for ref, version, b in _entries:
            if ref() is cu and version == cu._version:
                return b
    return None


def remember(cu: torch.Tensor, host) -> torch.Tensor:
    """Record the host list `host` (a sequence of ints) of the boundary tensor `cu`; returns cu."""
    b = Boundaries([int(x) for x in host])
    with _lock:
        _entries[:] = [e for e in _entries if e[0]() is not cu]
        _entries.append((weakref.ref(cu), cu._version, b))
        del _entries[:-CACHE_SIZE]
    return cu


def device_boundaries(host: torch.Tensor, device) -> torch.Tensor:
    """The loader's step: host int32 [N + 1] boundaries -> their device copy, with the host list recorded (so no
    layer reads the device copy back)."""
    return remember(host.to(device=device, dtype=torch.int32), host.tolist())


def boundaries(cu: torch.Tensor) -> Boundaries:
    """The Boundaries of `cu`: recorded by the loader, or read from the tensor once (then cached)."""
    b = _find(cu)
    if b is None:
        remember(cu, cu.tolist())
        b = _find(cu)
    return b


__all__ = ["Boundaries", "boundaries", "remember", "device_boundaries", "CACHE_SIZE"]
