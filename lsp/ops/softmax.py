"""Softmax attention on PyTorch SDPA (FlashAttention / memory-efficient kernels where the device has them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def document_mask(cu_seqlens: torch.Tensor, T: int, causal: bool, device, q_positions=None, k_positions=None):
    """Boolean [Tq, Tk] mask: True where query i may attend key j (same packed document, j <= i when causal).

    q_positions / k_positions: global token positions of the query / key rows (default 0..T-1), so the same mask
    serves a rank that holds only part of the queries.
    """
    qp = torch.arange(T, device=device) if q_positions is None else q_positions
    kp = torch.arange(T, device=device) if k_positions is None else k_positions
    bounds = cu_seqlens.to(device=device, dtype=torch.long)
    q_doc = torch.bucketize(qp, bounds[1:], right=True)
    k_doc = torch.bucketize(kp, bounds[1:], right=True)
    mask = q_doc[:, None] == k_doc[None, :]
    if causal:
        mask &= kp[None, :] <= qp[:, None]
    return mask


def check_softmax_inputs(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D] / [B, T, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k and v must be [B, Tk, Hkv, D] matching q's B and D, got q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")


def sdpa(q, k, v, *, mask=None, causal=False, scale=None):
    """SDPA on [B, T, H, D] tensors with grouped-query heads expanded; mask: [Tq, Tk] bool or None."""
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if rep > 1:
        kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal and mask is None, scale=scale)
    return o.transpose(1, 2)


def softmax_attention(q, k, v, *, causal=True, scale=None, cu_seqlens=None):
    """Softmax attention. q: [B, T, H, D]; k, v: [B, T, Hkv, D] (grouped-query when Hkv < H) -> [B, T, H, D].

    cu_seqlens (int32 [N + 1], B == 1) restricts attention to each packed document.
    """
    check_softmax_inputs(q, k, v)
    mask = None
    if cu_seqlens is not None:
        if q.shape[0] != 1:
            raise ValueError(f"cu_seqlens requires B == 1 (packed sequences), got B={q.shape[0]}")
        mask = document_mask(cu_seqlens, q.shape[1], causal, q.device)
    return sdpa(q, k, v, mask=mask, causal=causal, scale=scale)
