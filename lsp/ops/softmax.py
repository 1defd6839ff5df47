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


def heads_first(q, k, v):
    """[B, T, H, D] q and [B, T, Hkv, D] k, v -> [B, H, T, D] each, grouped-query KV heads repeated to H."""
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if rep > 1:
        kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
    return qt, kt, vt


def sdpa(q, k, v, *, mask=None, causal=False, scale=None):
    """SDPA on [B, T, H, D] tensors with grouped-query heads expanded; mask: [Tq, Tk] bool or None."""
    qt, kt, vt = heads_first(q, k, v)
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal and mask is None, scale=scale)
    return o.transpose(1, 2)


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


class _PrefixDiagonalAttention(torch.autograd.Function):
    """Bottom-right causal attention on the CPU flash kernel, as two key blocks merged by log-sum-exp.

    q: [B, H, Tq, D]; k, v: [B, H, Tk, D], Tk >= Tq. Keys [0, Tk - Tq) are visible to every query (no mask), keys
    [Tk - Tq, Tk) form the causal diagonal block. Backward runs the kernel's own backward per block with the merged
    output and log-sum-exp, which gives each block's exact share of dq and its dk, dv (the ring-attention identity).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale):
        P = k.shape[2] - q.shape[2]
        acc = torch.promote_types(q.dtype, torch.float32)
        blocks = [(0, P, False), (P, k.shape[2], True)] if P else [(0, k.shape[2], True)]
        outs = [_CPU_FLASH(q, k[:, :, a:b], v[:, :, a:b], 0.0, causal, attn_mask=None, scale=scale)
                for a, b, causal in blocks]
        lse = torch.logsumexp(torch.stack([l.to(acc) for _, l in outs]), dim=0)           # [B, H, Tq]
        o = sum(torch.exp(l.to(acc) - lse).unsqueeze(-1) * o_b.to(acc) for o_b, l in outs).to(q.dtype)
        lse = lse.to(outs[0][1].dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.blocks, ctx.scale = blocks, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous().to(q.dtype)
        dq, dks, dvs = torch.zeros_like(q), [], []
        for a, b, causal in ctx.blocks:
            dq_b, dk_b, dv_b = _CPU_FLASH_BACKWARD(do, q, k[:, :, a:b], v[:, :, a:b], o, lse, 0.0, causal,
                                                   attn_mask=None, scale=ctx.scale)
            dq += dq_b
            dks.append(dk_b)
            dvs.append(dv_b)
        return dq, torch.cat(dks, dim=2), torch.cat(dvs, dim=2), None


def lower_right_sdpa(qt, kt, vt, scale=None):
    """SDPA with PyTorch's lower-right causal bias (FlashAttention / memory-efficient kernels on CUDA, which align
    causal masks bottom-right without materialising them). [B, H, T, D] tensors, equal heads."""
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(qt.shape[2], kt.shape[2]),
                                          scale=scale)


def causal_suffix_attention(q, k, v, *, scale=None):
    """Causal attention of queries that are the last Tq of Tk positions (bottom-right aligned): query i sits at
    position Tk - Tq + i and sees keys 0 .. Tk - Tq + i. q: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D] -> [B, Tq, H, D].

    This is what a sequence-parallel rank computes for one of its segments against the gathered keys; unlike a
    boolean mask it never forms a [Tq, Tk] tensor and scores only the causal pairs. CUDA: SDPA's lower-right causal
    bias; CPU: the flash kernel on the visible prefix and on the causal diagonal block, merged by log-sum-exp.
    """
    check_softmax_inputs(q, k, v)
    Tq, Tk = q.shape[1], k.shape[1]
    if Tk < Tq:
        raise ValueError(f"k must have at least as many positions as q for a causal suffix, got {Tk} < {Tq}")
    if Tq == Tk:
        return sdpa(q, k, v, causal=True, scale=scale)
    qt, kt, vt = heads_first(q, k, v)
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        o = _PrefixDiagonalAttention.apply(qt.contiguous(), kt.contiguous(), vt.contiguous(), scale)
    else:
        o = lower_right_sdpa(qt, kt, vt, scale)
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
