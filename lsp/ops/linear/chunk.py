"""Chunked linear attention in plain PyTorch (the CPU path, differentiable).

Split each sequence into chunks of C tokens and let G_i be the within-chunk cumulative log-decay (G_i <= 0, non-
increasing). With S the state entering the chunk:

    o_i      = scale * [ (q_i ⊙ exp(G_i)) S  +  Σ_{j<=i} (q_i ⊙ exp(G_i - G_j)) · k_j  v_j ]
    S_next   = exp(G_C) ⊙ S + Σ_j (k_j ⊙ exp(G_C - G_j))ᵀ v_j

Every exponent above is <= 0, so nothing overflows whatever the decay. For per-key decay the intra-chunk scores
Σ_d q_id k_jd exp(G_id - G_jd) do not factor into one matmul; they are built from sub-blocks of 16 tokens: exact
products on the diagonal blocks, and off the diagonal a factorisation about the start s of the query block,
exp(G_i - G_j) = exp(G_i - G_s) · exp(G_s - G_j), both factors <= 1 (the same idea as fla's secondary chunking).
The diagonal blocks are formed one token offset at a time (only causal pairs) by `_DiagonalBlocks`, whose backward
is written by hand; everything else is differentiated by autograd.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lsp.names import CHUNK_SIZE

from .checks import acc_dtype
from .layout import ChunkLayout, chunk_layout

SUB_BLOCK = 16


def _to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    # [R, NC * C, H, D] -> [R, H, NC, C, D]
    R, Tp, H, D = x.shape
    return x.view(R, Tp // C, C, H, D).permute(0, 3, 1, 2, 4).contiguous()


def _from_chunks(x: torch.Tensor) -> torch.Tensor:
    # [R, H, NC, C, D] -> [R, NC * C, H, D]
    R, H, NC, C, D = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(R, NC * C, H, D)


def _causal_mask(C: int, device) -> torch.Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril()


def _intra_scores_scalar(q, k, G):
    # q, k: [R, H, NC, C, K]; G: [R, H, NC, C, 1] -> scores [R, H, NC, C, C] (j <= i)
    C = q.shape[-2]
    diff = G[..., :, None, 0] - G[..., None, :, 0]
    decay = torch.where(_causal_mask(C, q.device), diff, float("-inf")).exp()
    return (q @ k.transpose(-1, -2)) * decay


def intra_scores_key(q, k, G, sub: int = SUB_BLOCK):
    """Σ_d q_id k_jd exp(G_id - G_jd) on j <= i, without overflow (the module docstring's sub-block scheme).

    q, k, G: [R, H, NC, C, K] (C a multiple of `sub`, or <= it) -> scores [R, H, NC, C, C]. Also the DPLR's pair
    sums (lsp/ops/dplr/chunk.py)."""
    R, H, NC, C, K = q.shape
    sub = min(sub, C)
    nb = C // sub
    diag = _DiagonalBlocks.apply(*(x.reshape(R, H, NC, nb, sub, K) for x in (q, k, G)))  # [.., nb, sub, sub]
    rows = []
    for i in range(nb):  # query block i: keys of the earlier blocks (factorised about s), then its own block
        s = i * sub
        parts = []
        if i > 0:
            G_s = G[..., s : s + 1, :]                                                  # [.., 1, K]
            q_t = q[..., s : s + sub, :] * (G[..., s : s + sub, :] - G_s).exp()        # [.., sub, K]
            k_t = k[..., :s, :] * (G_s - G[..., :s, :]).exp()                          # [.., s, K]
            parts.append(q_t @ k_t.transpose(-1, -2))                                   # [.., sub, s]
        parts.append(diag[..., i, :, :])
        if s + sub < C:
            parts.append(q.new_zeros(R, H, NC, sub, C - s - sub))
        rows.append(torch.cat(parts, dim=-1))
    return torch.cat(rows, dim=-2)


class _DiagonalBlocks(torch.autograd.Function):
    """Exact causal scores inside each sub-block, s[i, j] = Σ_d q_id k_jd exp(G_id - G_jd) for j <= i.

    One token offset d = i - j at a time: only the causal pairs are formed (no [sub, sub, K] tensor, no mask) and
    every exponent is <= 0. The backward is written out (dq_i = Σ_j ds_ij k_j e_ij, dk_j = Σ_i ds_ij q_i e_ij,
    dG = q dq - k dk) and accumulates into two buffers in place: autograd through the per-offset slices would
    allocate a zero-filled full-size gradient per slice. exp is recomputed in backward instead of stored.
    """

    @staticmethod
    def forward(ctx, qb, kb, Gb):
        # qb, kb, Gb: [.., nb, sub, K] -> [.., nb, sub, sub]
        ctx.save_for_backward(qb, kb, Gb)
        sub = qb.shape[-2]
        out = qb.new_zeros(*qb.shape[:-1], sub)
        for d in range(sub):
            e = (Gb[..., d:, :] - Gb[..., : sub - d, :]).exp_()
            out.diagonal(-d, -2, -1).copy_((qb[..., d:, :] * kb[..., : sub - d, :] * e).sum(-1))
        return out

    @staticmethod
    def backward(ctx, ds):
        qb, kb, Gb = ctx.saved_tensors
        sub = qb.shape[-2]
        dq, dk = torch.zeros_like(qb), torch.zeros_like(kb)
        for d in range(sub):
            w = (Gb[..., d:, :] - Gb[..., : sub - d, :]).exp_().mul_(ds.diagonal(-d, -2, -1)[..., None])
            dq[..., d:, :] += w * kb[..., : sub - d, :]
            dk[..., : sub - d, :] += w * qb[..., d:, :]
        return dq, dk, qb * dq - kb * dk


def _chunk_summaries(k, v, G):
    # k: [R, H, NC, C, K]; v: [R, H, NC, C, V]; G: [R, H, NC, C, Kg] or None
    # -> U: [R, H, NC, K, V] (each chunk's own state from zero), decay: [R, H, NC, Kg] or None
    if G is None:
        return k.transpose(-1, -2) @ v, None
    G_last = G[..., -1:, :]
    U = (k * (G_last - G).exp()).transpose(-1, -2) @ v
    return U, G_last[..., 0, :].exp()


def _scan_states(U, decay, layout: ChunkLayout, init):
    # U: [R, H, NC, K, V]; decay: [R, H, NC, Kg] or None; init: [R or N, H, K, V] or None
    # -> states entering every chunk [R, H, NC, K, V], final states [R or N, H, K, V]
    R, H, NC, K, V = U.shape
    packed = layout.dst is not None
    zero = U.new_zeros(R, H, K, V)
    finals = {}
    entering = []
    state = zero
    # unbind once: indexing U[:, :, c] per chunk would make autograd allocate and zero a full-size gradient of U for
    # every chunk (NC memsets of U's size in backward); unbind's backward stacks the chunk gradients once
    U_c = U.unbind(2)
    decay_c = None if decay is None else decay[..., None].unbind(2)
    for c in range(NC):
        if c in layout.resets:
            n = layout.resets[c]
            if init is None:
                state = zero
            else:
                state = init[n : n + 1] if packed else init
        entering.append(state)
        state = state + U_c[c] if decay is None else decay_c[c] * state + U_c[c]
        for n in layout.ends.get(c, []):
            finals[n] = state
    if not packed:
        final = finals[-1]
    else:
        n_seq = len(layout.resets) + len(layout.empty)
        for n in layout.empty:
            finals[n] = zero[:1] if init is None else init[n : n + 1]
        final = torch.cat([finals[n] for n in range(n_seq)], dim=0)
    return torch.stack(entering, dim=2), final


@dataclass
class ChunkInputs:
    """k, v and the within-chunk cumulative log-decay, padded into chunks once (shared by both phases)."""

    layout: ChunkLayout
    kc: torch.Tensor               # [R, H, NC, C, K] accumulation dtype
    vc: torch.Tensor               # [R, H, NC, C, V]
    G: torch.Tensor | None         # [R, H, NC, C, Kg] within-chunk cumulative log-decay, or None

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H, D] -> [R, H, NC, C, D] in the accumulation dtype (differentiable)."""
        return _to_chunks(self.layout.pad(x.to(self.kc.dtype)), self.layout.chunk_size)


def chunk_prepare(k, v, g, cu_seqlens=None, chunk_size: int = CHUNK_SIZE) -> ChunkInputs:
    """Pad k, v (and the cumulative log-decay of g, broadcastable to [B, T, H, K]) into chunks."""
    B, T, H, K = k.shape
    layout = chunk_layout(B, T, cu_seqlens, chunk_size, k.device)
    dt = acc_dtype(k.dtype)
    prep = ChunkInputs(layout, None, None, None)
    prep.kc, prep.vc = _to_chunks(layout.pad(k.to(dt)), chunk_size), _to_chunks(layout.pad(v.to(dt)), chunk_size)
    if g is not None:
        prep.G = prep.pad(g.to(dt).expand(B, T, H, g.shape[-1])).cumsum(dim=3)
    return prep


def chunk_states(prep: ChunkInputs, initial_state=None):
    """Phase 1: the state entering every chunk, h [R, H, NC, K, V], and the final state(s) [B or N, H, K, V]."""
    init = None if initial_state is None else initial_state.to(prep.kc.dtype)
    U, decay = _chunk_summaries(prep.kc, prep.vc, prep.G)
    return _scan_states(U, decay, prep.layout, init)


def chunk_output(q, prep: ChunkInputs, h, scale, out_dtype=None):
    """Phase 2: o [B, T, H, V] from the chunk-entering states h (in out_dtype, default q's dtype)."""
    qc, kc, vc, G = prep.pad(q), prep.kc, prep.vc, prep.G
    C = prep.layout.chunk_size
    if G is None:
        scores = (qc @ kc.transpose(-1, -2)).masked_fill(~_causal_mask(C, q.device), 0.0)
        q_inter = qc
    else:
        scores = _intra_scores_scalar(qc, kc, G) if G.shape[-1] == 1 else intra_scores_key(qc, kc, G)
        q_inter = qc * G.exp()
    o = scale * (scores @ vc + q_inter @ h.to(qc.dtype))
    return prep.layout.unpad(_from_chunks(o)).to(out_dtype or q.dtype)


def chunk_linear_attention(q, k, v, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
                           chunk_size: int = CHUNK_SIZE):
    """Chunked forward; arguments as `lsp.ops.linear_attention` with g already broadcastable to [B, T, H, K]."""
    prep = chunk_prepare(k, v, g, cu_seqlens, chunk_size)
    h, final = chunk_states(prep, initial_state)
    return chunk_output(q, prep, h, scale), (final if output_final_state else None)
