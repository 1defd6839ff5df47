"""`deltanet`: DeltaNet, the delta rule without decay (`_delta.py`)."""
from __future__ import annotations

from ..linear_kind import register_kind
from ._delta import DeltaKind


@register_kind
class DeltaNet(DeltaKind):
    name = "deltanet"
