"""`linear`: plain linear attention, no decay. q, k are L2-normalised per head, which keeps every score in [-1, 1];
the output RMSNorm removes the growth of the un-decayed state with length. A segment's map is the identity."""
from __future__ import annotations

import torch.nn.functional as F

from ..linear_kind import register_kind
from ._decay import DecayKind


@register_kind
class Linear(DecayKind):
    name = "linear"
    state_map = "identity"

    def features(self, q, k):
        # q, k: [B, T, H, K] -> unit vectors per head
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1)
