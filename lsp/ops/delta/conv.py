r"""Short causal depthwise convolution (Gated DeltaNet applies one, kernel 4, to q, k and v before the delta rule).

    y_t = bias + Σ_{j=0}^{k-1} w[:, k-1-j] ⊙ x_{t-j} · [doc(t - j) = doc(t)]

Inputs before a document's start count as zero. `halo` supplies the k-1 inputs preceding x (the previous
sequence-parallel segment's tail) and `seq_ids` the document of every position of [halo, x], so a segment computes
exactly what the whole sequence would: this is all sequence parallelism needs.
"""
from __future__ import annotations

import torch


def _ids_from_cu(cu_seqlens, T: int, k: int, device) -> torch.Tensor:
    # document index of every position of [halo (k - 1), x (T)]; the (absent) halo gets -1
    ids = torch.full((k - 1 + T,), -1, dtype=torch.long, device=device)
    if cu_seqlens is None:
        ids[k - 1 :] = 0
        return ids[None]
    ids[k - 1 :] = torch.searchsorted(cu_seqlens.to(device).long(), torch.arange(T, device=device), right=True) - 1
    return ids[None]


def short_conv(x, weight, bias=None, *, cu_seqlens=None, halo=None, seq_ids=None):
    """Causal depthwise convolution within documents.

    Args:
        x: [B, T, D]; weight: [D, k]; bias: [D] or None.
        cu_seqlens: int32 [N + 1] packed documents in x (B == 1), or None (one document per row).
        halo: [B, k - 1, D] inputs preceding x (zeros when None); seq_ids: [B or 1, k - 1 + T] document of every
            position of [halo, x] (only with halo; positions with a different document than t do not reach y_t).

    Returns y: [B, T, D] in x's dtype. Differentiable in x, weight, bias and halo.
    """
    B, T, D = x.shape
    k = weight.shape[-1]
    if weight.shape != (D, k):
        raise ValueError(f"weight must have shape [D, k] = [{D}, k], got {tuple(weight.shape)}")
    if (halo is None) != (seq_ids is None) or (halo is not None and cu_seqlens is not None):
        raise ValueError("pass halo together with seq_ids, and not with cu_seqlens")
    if seq_ids is None:
        seq_ids = _ids_from_cu(cu_seqlens, T, k, x.device)
        halo = x.new_zeros(B, k - 1, D)
    xe = torch.cat([halo.to(x.dtype), x], dim=1)                              # [B, k - 1 + T, D]
    own = seq_ids[:, k - 1 :]
    y = x * weight[:, k - 1]
    for j in range(1, k):  # the input j steps back, only where it lies in the same document
        same = (seq_ids[:, k - 1 - j : k - 1 - j + T] == own)[..., None].to(x.dtype)
        y = y + xe[:, k - 1 - j : k - 1 - j + T] * same * weight[:, k - 1 - j]
    return y if bias is None else y + bias
