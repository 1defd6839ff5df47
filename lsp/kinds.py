"""The registry of linear layer kinds (`model.linear_attn`), torch-free so that a config is checked before torch loads.

A kind is one class (`lsp.models.linear_kind.LinearKind`) registered once under its name. The built-in kinds are
the files of `lsp/models/kinds/` (file name = kind name, shared family code in files starting with `_`): their names
are read from the directory without importing anything, and `lsp.models.layer_kind(name)` imports the file, whose
class registers itself. A kind defined elsewhere (a test, a user's module) registers with
`lsp.models.register_kind` before the config naming it is built. So adding a kind edits no shared file.
"""
from __future__ import annotations

import os

KINDS_DIR = os.path.join(os.path.dirname(__file__), "models", "kinds")
KINDS_PACKAGE = "lsp.models.kinds"

_REGISTERED: dict = {}   # name -> the kind's class (stored untyped here: this module never imports torch)


def builtin_kind_names() -> tuple:
    """The kinds shipped in lsp/models/kinds/, sorted (one file each; `_*.py` are shared family code)."""
    files = os.listdir(KINDS_DIR)
    return tuple(sorted(f[:-3] for f in files if f.endswith(".py") and not f.startswith("_")))


def kind_names() -> tuple:
    """Every kind a config may name: the built-in ones, then those registered from outside the package."""
    builtin = builtin_kind_names()
    return builtin + tuple(sorted(set(_REGISTERED) - set(builtin)))


def registered(name: str):
    """The class registered under `name`, or None (not registered yet, or unknown)."""
    return _REGISTERED.get(name)


def add(name: str, cls) -> None:
    """Register `cls` as kind `name`; a second, different class under a taken name raises (one name, one class)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"layer kind name must be an identifier, got {name!r}")
    if _REGISTERED.get(name, cls) is not cls:
        raise ValueError(f"layer kind {name!r} is already registered ({_REGISTERED[name].__qualname__})")
    _REGISTERED[name] = cls


__all__ = ["builtin_kind_names", "kind_names", "registered", "add"]
