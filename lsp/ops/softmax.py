"""Softmax attention on PyTorch SDPA (FlashAttention / memory-efficient kernels where the device has them).

Packed documents run mask-free (`piecewise_attention`): the queries are cut into pieces that each lie in one
document, and piece p (positions [a, b) of a document starting at d) computes

    o_i = Σ_j softmax_j(q_i·k_j · scale) v_j   over keys j in its own tokens [a, i] (causal) or [a, b), plus
          fully visible key blocks (e.g. [d, a) of the same document held elsewhere),

each block by the flash kernel and the blocks merged by their log-sum-exp. No [Tq, Tk] mask or score tensor
exists; grouped-query heads go to the kernel unrepeated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lsp.ops.boundaries import boundaries


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
        raise ValueError(f"q, k, v must be [B, T, H, D] / [B, T, Hkv, D], "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k and v must be [B, Tk, Hkv, D] matching q's B and D, "
                         f"got q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")


def heads_first(q, k, v):
    """[B, T, H, D] q and [B, T, Hkv, D] k, v -> [B, H, T, D] / [B, Hkv, T, D] views (grouped heads unrepeated)."""
    return tuple(x.transpose(1, 2) for x in (q, k, v))


def sdpa(q, k, v, *, mask=None, causal=False, scale=None):
    """SDPA on [B, T, H, D] tensors, grouped-query heads through enable_gqa (K, V are not repeated); mask: [Tq, Tk]
    bool or None."""
    qt, kt, vt = heads_first(q, k, v)
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                       enable_gqa=kt.shape[1] != qt.shape[1])
    return o.transpose(1, 2)


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def lower_right_sdpa(qt, kt, vt, scale=None):
    """SDPA with PyTorch's lower-right causal bias (FlashAttention / memory-efficient kernels on CUDA, which align
    causal masks bottom-right without materialising them). [B, H, T, D] q, [B, Hkv, T, D] k, v."""
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(qt.shape[2], kt.shape[2]),
                                          scale=scale, enable_gqa=kt.shape[1] != qt.shape[1])


@dataclass(frozen=True)
class PieceRun:
    """`count` adjacent query pieces of `length` tokens from local position `start`. Each piece attends its own
    tokens (causally when the call is causal) and, fully visible, `blocks`: (source, first, length) key ranges of
    the shared K|V sources. count > 1 only without blocks and with B == 1: the pieces form one batched kernel call.
    """
    start: int
    length: int
    count: int = 1
    blocks: tuple[tuple[int, int, int], ...] = ()


def piece_runs(bounds: list[int], blocks: dict | None = None, batched: bool = True) -> list[PieceRun]:
    """Runs of the pieces [bounds[i], bounds[i+1]): adjacent equal-length pieces without key blocks are batched
    when `batched` (packed documents of equal length cost one kernel call); blocks: {piece index: key blocks}."""
    blocks = blocks or {}
    runs: list[PieceRun] = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        extra = tuple(blocks.get(i, ()))
        last = runs[-1] if runs else None
        if batched and not extra and last is not None and not last.blocks and last.length == b - a:
            runs[-1] = PieceRun(last.start, last.length, last.count + 1)
        else:
            runs.append(PieceRun(a, b - a, 1, extra))
    return runs


def _rows(x, run: PieceRun):
    # x: [B, T, h, *] -> [B·count, h, length, *] view of the run's pieces (lse [B, T, H] -> [B·count, H, length])
    piece = x[:, run.start : run.start + run.count * run.length]
    return piece.view(x.shape[0] * run.count, run.length, *x.shape[2:]).transpose(1, 2)


def _source_block(sources, block, which: int):
    # sources: [S, T_src, B, 2, Hkv, D] K|V -> keys (which=0) or values (1) of one block: [B, Hkv, length, D] view
    s, first, length = block
    return sources[s, first : first + length, :, which].permute(1, 2, 0, 3)


def _run_blocks(k, v, sources, run: PieceRun, causal: bool):
    # -> [(keys, values, causal)] views: the run's own (square) block, then its fully visible source blocks
    own = [(_rows(k, run), _rows(v, run), causal)]
    return own + [(_source_block(sources, b, 0), _source_block(sources, b, 1), False) for b in run.blocks]


def flash_block_forward(q, k, v, causal, scale):
    """One key block by the flash kernel: q [N, H, Tq, D]; k, v [N, Hkv, Tk, D] (strided views; grouped heads
    unrepeated; causal: top-left aligned, Tq == Tk) -> o [N, H, Tq, D] (q's dtype), lse [N, H, Tq]."""
    if q.device.type == "cpu":
        return _CPU_FLASH(q, k, v, 0.0, causal, attn_mask=None, scale=scale)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"packed softmax attention on {q.device.type} runs FlashAttention: q, k, v must be "
                         f"float16 or bfloat16, got {q.dtype}")
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def flash_block_backward(do, q, k, v, o, lse, causal, scale):
    """dq, dk, dv of one key block: the kernel's own backward with the MERGED o and lse (over every block a query
    attends) gives this block's exact share of dq and its own dk, dv."""
    if q.device.type == "cpu":
        return _CPU_FLASH_BACKWARD(do, q, k, v, o, lse, 0.0, causal, attn_mask=None, scale=scale)
    none = q.new_empty(0, dtype=torch.int64)           # dense (no cumulative lengths), dropout 0 (no philox state)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, o, lse, none, none, q.shape[2], k.shape[2], 0.0, causal, none, none, scale=scale)


def merge_blocks(o, lse, o_b, lse_b):
    """Online softmax: the attention over the union of two disjoint key sets from each one's output and
    log-sum-exp, lse = log(e^lse + e^lse_b), o = e^(lse_a - lse)·o_a + e^(lse_b - lse)·o_b (accumulation dtype).
    o, o_b: [N, H, Tq, D]; lse, lse_b: [N, H, Tq]; lse = -inf (with o = 0) is the empty set."""
    acc = torch.promote_types(o_b.dtype, torch.float32)
    lse, lse_b = lse.to(acc), lse_b.to(acc)
    merged = torch.logaddexp(lse, lse_b)
    o = torch.exp(lse - merged).unsqueeze(-1) * o.to(acc) + torch.exp(lse_b - merged).unsqueeze(-1) * o_b.to(acc)
    return o, merged


def _merged_forward(q, blocks, scale):
    # q: [N, H, Tq, D] -> o (q's dtype), lse [N, H, Tq]: one softmax over the union of the blocks' keys
    outs = [flash_block_forward(q, k, v, causal, scale) for k, v, causal in blocks]
    if len(outs) == 1:
        return outs[0]
    o, lse = outs[0]
    for o_b, lse_b in outs[1:]:
        o, lse = merge_blocks(o, lse, o_b, lse_b)
    return o.to(q.dtype), lse


class _PiecewiseAttention(torch.autograd.Function):
    """Every run by the flash kernel on views (no copies of K, V); saves q, k, v, the sources, o and lse only.
    Backward writes each block's gradients into its slice of dk, dv, d(sources): no per-piece autograd graph."""

    @staticmethod
    def forward(ctx, q, k, v, sources, runs, causal, scale):
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = q.new_empty(*q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))     # [B, T, H]
        for run in runs:
            o_run, lse_run = _merged_forward(_rows(q, run), _run_blocks(k, v, sources, run, causal), scale)
            _rows(o, run).copy_(o_run)
            _rows(lse, run).copy_(lse_run)
        ctx.save_for_backward(q, k, v, sources, o, lse)
        ctx.runs, ctx.causal, ctx.scale = runs, causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, sources, o, lse = ctx.saved_tensors
        do = do.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dsrc = None if sources is None else torch.zeros_like(sources)
        for run in ctx.runs:
            do_r, q_r, o_r, lse_r, dq_r = (_rows(x, run) for x in (do, q, o, lse, dq))
            lse_r = lse_r.contiguous()
            for (k_b, v_b, causal), (dk_b, dv_b, _) in zip(_run_blocks(k, v, sources, run, ctx.causal),
                                                           _run_blocks(dk, dv, dsrc, run, ctx.causal)):
                g_q, g_k, g_v = flash_block_backward(do_r, q_r, k_b, v_b, o_r, lse_r, causal, ctx.scale)
                dq_r += g_q
                dk_b += g_k
                dv_b += g_v
        return dq, dk, dv, dsrc, None, None, None


def piecewise_attention(q, k, v, runs, *, kv_sources=None, causal=True, scale=None):
    """Attention of query pieces to their own tokens plus fully visible key blocks (see the module docstring).

    q: [B, T, H, D]; k, v: [B, T, Hkv, D] (the same T positions as q); runs: `PieceRun`s covering [0, T);
    kv_sources: [S, T_src, B, 2, Hkv, D] K|V pairs the runs' blocks index (e.g. an all-gathered sequence), or None.
    Returns [B, T, H, D]. Differentiable in q, k, v and kv_sources.
    """
    check_softmax_inputs(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k, v must cover the query positions, got Tq={q.shape[1]} Tk={k.shape[1]}")
    if any(r.count > 1 for r in runs) and q.shape[0] != 1:
        raise ValueError(f"batched piece runs need B == 1 (packed sequences), got B={q.shape[0]}")
    covered = sum(r.count * r.length for r in runs)
    assert covered == q.shape[1] and all(r.start + r.count * r.length == n.start for r, n in zip(runs, runs[1:])), \
        f"piece runs must tile [0, {q.shape[1]}), got {runs}"
    if any(r.blocks for r in runs) and kv_sources is None:
        raise ValueError("kv_sources is required when piece runs have key blocks")
    return _PiecewiseAttention.apply(q, k, v, kv_sources, tuple(runs), causal, scale)


def causal_suffix_attention(q, k, v, *, scale=None):
    """Causal attention of queries that are the last Tq of Tk positions (bottom-right aligned): query i sits at
    position Tk - Tq + i and sees keys 0 .. Tk - Tq + i. q: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D] -> [B, Tq, H, D].

    Never forms a [Tq, Tk] tensor and scores only the causal pairs. CUDA: SDPA's lower-right causal bias; CPU: one
    piece (`piecewise_attention`) over its causal diagonal block plus the fully visible prefix as a key block.
    """
    check_softmax_inputs(q, k, v)
    Tq, Tk = q.shape[1], k.shape[1]
    if Tk < Tq:
        raise ValueError(f"k must have at least as many positions as q for a causal suffix, got {Tk} < {Tq}")
    if Tq == Tk:
        return sdpa(q, k, v, causal=True, scale=scale)
    if q.device.type != "cpu":
        qt, kt, vt = heads_first(q, k, v)
        return lower_right_sdpa(qt, kt, vt, scale).transpose(1, 2)
    P = Tk - Tq
    prefix = torch.stack([k[:, :P], v[:, :P]], dim=2).transpose(0, 1).unsqueeze(0)     # [1, P, B, 2, Hkv, D]
    return piecewise_attention(q, k[:, P:], v[:, P:], [PieceRun(0, Tq, 1, ((0, 0, P),))], kv_sources=prefix,
                               scale=scale)


def softmax_attention(q, k, v, *, causal=True, scale=None, cu_seqlens=None):
    """Softmax attention. q: [B, T, H, D]; k, v: [B, T, Hkv, D] (grouped-query when Hkv < H) -> [B, T, H, D].

    cu_seqlens (int32 [N + 1], B == 1) restricts attention to each packed document, mask-free: each document is one
    piece (`piecewise_attention`), documents of equal length side by side one batched kernel call.
    """
    check_softmax_inputs(q, k, v)
    if cu_seqlens is None:
        return sdpa(q, k, v, causal=causal, scale=scale)
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens requires B == 1 (packed sequences), got B={q.shape[0]}")
    host = boundaries(cu_seqlens).host                        # the loader's host copy: no read back
    bounds = sorted(set(host))                                # an empty document holds no piece
    if bounds[0] != 0 or bounds[-1] != q.shape[1]:
        raise ValueError(f"cu_seqlens must run from 0 to T={q.shape[1]}, got {host}")
    return piecewise_attention(q, k, v, piece_runs(bounds), causal=causal, scale=scale)
