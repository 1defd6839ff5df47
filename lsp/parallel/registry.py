"""A registry of SP methods for one layer family: a method is registered once with everything the rest of the
system asks of it (its implementation and its cost formula at least); a lookup of an unknown name raises.

The linear layers' methods live in `lsp.parallel.methods.LINEAR` (entries `SPMethod`); a softmax family registers
its methods (LASP-2H all-gather, a K/V ring) in its own `MethodRegistry` the same way.
"""
from __future__ import annotations


class MethodRegistry:
    """name -> entry, for one layer family. `required` names the entry fields that must be callable."""

    def __init__(self, family: str, builtins: tuple[str, ...], required: tuple[str, ...] = ("handle", "cost")):
        self.family, self.builtins, self.required = family, builtins, required
        self._entries: dict = {}

    def register(self, entry):
        """Add `entry` (with a `name` and the `required` callables); a missing part or a taken name raises."""
        for part in self.required:
            if not callable(getattr(entry, part, None)):
                raise ValueError(f"{self.family} SP method {entry.name!r}: {part} must be callable, got "
                                 f"{getattr(entry, part, None)!r}")
        if entry.name in self._entries:
            raise ValueError(f"{self.family} SP method {entry.name!r} is already registered")
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name)

    def get(self, name: str):
        """The entry of `name`; an unknown name raises one line naming the choices."""
        if name not in self._entries:
            raise ValueError(f"{self.family} method must be one of {self.names()}, got {name!r}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """The registered names, the built-ins first (in their listed order)."""
        order = {n: i for i, n in enumerate(self.builtins)}
        return tuple(sorted(self._entries, key=lambda n: (order.get(n, len(order)), n)))

    def check_registered(self, names=None) -> None:
        """Every name in `names` (default: the built-ins the config accepts) is registered, or this raises."""
        missing = [n for n in (self.builtins if names is None else names) if n not in self._entries]
        if missing:
            raise RuntimeError(f"{self.family} SP methods named but never registered: {missing}")


__all__ = ["MethodRegistry"]
