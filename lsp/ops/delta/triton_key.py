r"""The delta rule's Triton kernels for a gate per key channel (Kimi Delta Attention): what differs per head.

With G [.., C, K] the within-chunk cumulative log-decay per key channel, the chunk's two pair products do not factor
into one [C, C] decay matrix times a dot product:

    Akk_ij = Σ_d k_id k_jd exp(G_id − G_jd)  (j <= i),        A = beta_i Akk_ij (j < i)      (UT transform)
    P_ij   = Σ_d q_id k_jd exp(G_id − G_jd)  (j <= i)                                         (outputs)

Both are the linear op's per-key intra-chunk scores (lsp/ops/linear/triton_intra.py, `_intra_scores_kernel`: 16-row
sub-blocks, off the diagonal a factorisation about the sub-block edge, on it one key row at a time, every exponent
<= 0), launched here on the delta layout [R, H, NC, C, D] seen as the linear layout [R·H, NC·C, 1, D]. The UT
inverse, the output and their backward kernels (triton_intra.py, KEY=True) read Akk and P instead of forming them.
Backward, their gradients dAkk = beta_i dA_ij (from `_bwd_dA_kernel`) and dP = scale mask(dO Wᵀ) (from
`_bwd_k_key_kernel`) go through the linear op's `_intra_dqk_kernel`, which returns x's and y's gradients of a
product x_i · y_j exp(G_i − G_j); the decay's share of such a product is x ⊙ dx − y ⊙ dy (per channel), so

    dG = q ⊙ dq  +  k ⊙ (dk_x − dk_y)  −  k ⊙ dk_P  +  (the per-chunk terms of `_bwd_k_key_kernel`)

where q ⊙ dq covers both q ⊙ exp(G) (the state read) and P's left side: every path from q to the loss carries
exp(G_i) once. `_bwd_k_key_kernel` (one program per chunk, K in blocks) gives the rest per key channel: Wk's
exp(G) (+ beta k ⊙ Tᵀ dWk ⊙ exp(G)), Kd's exp(G_C − G_j) (− k ⊙ dKd, and their sum at the chunk's last row) and
the chunk decay exp(G_C) (+ ddec ⊙ exp(G_C) at the last row).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lsp.ops.linear.triton_chunk import _intra_grads, _intra_scores

from .triton_intra import _dot, _group_chunk, _key_decay, _rows, _state_product, _store_rows


def _as_linear_layout(x: torch.Tensor) -> torch.Tensor:
    # [R, H, NC, C, D] contiguous -> the linear kernels' [R·H, NC·C, 1, D] (a view)
    R, H, NC, C, D = x.shape
    return x.view(R * H, NC * C, 1, D)


def key_scores(xc: torch.Tensor, kc: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Σ_d x_id k_jd exp(G_id − G_jd) on j <= i, zero above: [R, H, NC, C, C] fp32.

    xc, kc: [R, H, NC, C, K] (input dtype, contiguous); G: [R, H, NC, C, K] fp32 cumulative log-decay per key.
    """
    R, H, NC, C, _ = xc.shape
    A = _intra_scores(*(_as_linear_layout(t) for t in (xc, kc, G)))
    return A.view(R, H, NC, C, C)


def key_intra_grads(qc, kc, G, dP, dAkk, dq, dk, dG) -> None:
    """Adds the gradients of P and Akk (module docstring) to dq, dk and dG in place.

    qc, kc: [R, H, NC, C, K] (input dtype); G, dq, dk, dG: [R, H, NC, C, K] fp32 (dq holds its state-read part,
    dG the per-chunk terms of `_bwd_k_key_kernel`); dP, dAkk: [R, H, NC, C, C] fp32.
    """
    lin = _as_linear_layout
    dk_p, dk_y, dk_x = torch.empty_like(dk), torch.empty_like(dk), torch.zeros_like(dk)
    _intra_grads(lin(qc), lin(kc), lin(G), lin(dP), lin(dq), lin(dk_p))       # dq += P's left-side gradient
    _intra_grads(lin(kc), lin(kc), lin(G), lin(dAkk), lin(dk_x), lin(dk_y))
    q, k = qc.to(dG.dtype), kc.to(dG.dtype)
    dG += q * dq + k * (dk_x - dk_y - dk_p)
    dk += dk_p + dk_x + dk_y


@triton.jit
def _bwd_k_key_kernel(q, k, beta, G, S, dO, W, TdW, dNext, ddec, dq, dk, dG, dP, dbeta, scale, K, V,
                      C: tl.constexpr, GROUPS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    # grid (NC, R * H): the per-chunk gradients of a gate per key (the key kernel of triton_intra.py without the
    # pair products, which go to dP and the 16-row kernels):
    #   dP = scale · mask(dO Wᵀ) (j <= i);   dq = scale exp(G) ⊙ dO S_cᵀ;   dk = beta exp(G) ⊙ Tᵀ dWk + exp(G_C − G) ⊙
    #   W dSᵀ with Tᵀ dWk = −(Tᵀ dW) S_cᵀ;   dbeta += Σ_K exp(G) ⊙ k ⊙ Tᵀ dWk;   dG [C, K] = beta k ⊙ Tᵀ dWk ⊙ exp(G)
    #   − k ⊙ dKd, and at the last row Σ_j k_j ⊙ dKd_j + ddec ⊙ exp(G_C) (q's share is added in torch, q ⊙ dq)
    ACC: tl.constexpr = dG.dtype.element_ty
    DT: tl.constexpr = q.dtype.element_ty
    chunk = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    qk = _group_chunk(chunk, tl.num_programs(0), GROUPS)
    cc = tl.arange(0, C)
    last = (cc == C - 1)[:, None]
    b = tl.load(beta + chunk * C + cc).to(ACC)
    dp = tl.zeros([C, C], dtype=ACC)
    for v0 in range(0, V, BV):
        dp += _dot(_rows(dO, chunk, C, V, 0, C, BV, v0), tl.trans(_rows(W, chunk, C, V, 0, C, BV, v0)), DT, ACC, PREC)
    _store_rows(dP, scale * tl.where(cc[:, None] >= cc[None, :], dp, 0.0), chunk, C, C, 0, C, C, 0)
    db = tl.load(dbeta + chunk * C + cc)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        k_t = _rows(k, qk, C, K, 0, C, BK, k0).to(ACC)
        e_start, e_end = _key_decay(G, G, chunk, C, K, BK, k0, ACC, True)
        dqs = scale * e_start * _state_product(dO, S, chunk, K, V, k0, C, BK, BV, DT, ACC, PREC)
        dkd = e_end * _state_product(W, dNext, chunk, K, V, k0, C, BK, BV, DT, ACC, PREC)
        tdwk = -_state_product(TdW, S, chunk, K, V, k0, C, BK, BV, DT, ACC, PREC)
        ktd = k_t * tdwk * e_start
        kdx = k_t * dkd
        db += tl.sum(ktd, 1)
        decay_end = tl.sum(tl.where(last, e_start, 0.0), 0)                   # exp(G_C) [BK]
        end = tl.sum(kdx, 0) + tl.load(ddec + chunk * K + kk, mask=kk < K, other=0.0) * decay_end
        _store_rows(dq, dqs, chunk, C, K, 0, C, BK, k0)
        _store_rows(dk, b[:, None] * e_start * tdwk + dkd, chunk, C, K, 0, C, BK, k0)
        _store_rows(dG, b[:, None] * ktd - kdx + tl.where(last, end[None, :], 0.0), chunk, C, K, 0, C, BK, k0)
    tl.store(dbeta + chunk * C + cc, db)
