r"""The DPLR delta rule in chunks of C tokens: the WY form, plain PyTorch, autograd backward.

Write the step as S_t = D_t S_{t-1} + b_t u_tᵀ + k_t v_tᵀ with D_t = Diag(exp g_t) and u_t = S_{t-1}ᵀ a_t (the
low-rank read). Inside a chunk entered with state S, let G_i be the within-chunk cumulative log-decay per key
channel (inclusive of token i) and G⁻_i = G_i - g_i (exclusive). Then

    S_i = exp(G_i) ⊙ S + Σ_{j<=i} exp(G_i - G_j) ⊙ (b_j u_jᵀ + k_j v_jᵀ)
    u_i = (a_i exp(G⁻_i))ᵀ S + Σ_{j<i} A_ab[i, j] u_j + A_ak[i, j] v_j,
          A_xy[i, j] = Σ_c x_i[c] exp(G⁻_i[c] - G_j[c]) y_j[c]   (j < i)

so (I - A_ab) U = A_ak V + (a ⊙ exp G⁻) S. One unit-lower-triangular solve per chunk gives U = U0 + W S with
U0 = (I - A_ab)^-1 A_ak V and W = (I - A_ab)^-1 (a ⊙ exp G⁻); with Bd_j, Kd_j = b_j, k_j ⊙ exp(G_C - G_j):

    S_next = exp(G_C) ⊙ S + Bdᵀ (U0 + W S) + Kdᵀ V
    o_i    = scale · [ (q_i exp(G_i))ᵀ S + Σ_{j<=i} P_qb[i, j] u_j + P_qk[i, j] v_j ],  P_qy with exp(G_i - G_j), j <= i

This is the delta rule's chunk form (lsp/ops/delta/chunk.py) with 2C rows: Kd' = [Bd; Kd], Wk' = [-W; 0],
U' = [U0; V], P' = [P_qb | P_qk] and a decay per key channel, so its chunk scan, the augmented-state maps that
sequence parallelism composes (`sequence_maps`) and the entering product (`enter_sequences`) serve it unchanged.
The pair sums are per-key-decay scores, built as GLA's are (`lsp.ops.linear.chunk.intra_scores_key`: sub-blocks of
16 tokens, exact on the diagonal blocks, factorised about a block start off it), so every exponent is <= 0 and
nothing overflows whatever the gates; A_ab, A_ak are those scores of a shifted one token up, moved down one row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lsp.names import CHUNK_SIZE
from lsp.ops.delta.chunk import DeltaChunks, chunk_readout, chunk_scan, to_chunks
from lsp.ops.linear.checks import acc_dtype
from lsp.ops.linear.chunk import intra_scores_key
from lsp.ops.linear.layout import chunk_layout


@dataclass(kw_only=True)
class DplrChunks(DeltaChunks):
    """DeltaChunks of the DPLR rule: G is per key channel [R, H, NC, C, K], Kd / Wk / U have 2C rows (module
    docstring), decay is [R, H, NC, K]; b keeps the chunked b for the output's P_qb."""

    b: torch.Tensor                # [R, H, NC, C, K]


def _strict_scores(x, y, G):
    # x, y, G: [.., C, K] -> Σ_c x_i[c] exp(G_{i-1}[c] - G_j[c]) y_j[c] on j < i  [.., C, C]: row i of the
    # inclusive scores of x shifted up one token (x_{i+1} against G_i), moved down one row
    shifted = torch.cat([x[..., 1:, :], torch.zeros_like(x[..., :1, :])], dim=-2)
    scores = intra_scores_key(shifted, y, G)
    return torch.cat([torch.zeros_like(scores[..., :1, :]), scores[..., :-1, :]], dim=-2)


def prepare_dplr_chunks(k, v, a, b, g, cu_seqlens=None, chunk_size: int = CHUNK_SIZE) -> DplrChunks:
    """Chunk the inputs and solve the WY system; k, a, b, g: [B, T, H, K], v: [B, T, H, V].

    Padding (to whole chunks per packed sequence) is exact: k = v = a = b = 0 and g = 0 make a token the identity.
    """
    B, T, H, K = k.shape
    dt = acc_dtype(k.dtype)
    layout = chunk_layout(B, T, cu_seqlens, chunk_size, k.device)
    kc, vc, ac, bc, gc = (to_chunks(x.to(dt), layout) for x in (k, v, a, b, g))
    G = gc.cumsum(dim=3)                                                  # [R, H, NC, C, K] inclusive
    G_ex = G - gc                                                         # before token i's own decay
    A_ab, A_ak = _strict_scores(ac, bc, G), _strict_scores(ac, kc, G)     # strictly lower [.., C, C]
    rhs = torch.cat([A_ak @ vc, ac * G_ex.exp()], dim=-1)
    # unitriangular ignores the (zero) diagonal of -A_ab: this solves (I - A_ab) X = rhs
    sol = torch.linalg.solve_triangular(-A_ab, rhs, upper=False, unitriangular=True)
    U0, W = sol[..., : v.shape[-1]], sol[..., v.shape[-1]:]
    to_end = (G[..., -1:, :] - G).exp()
    Kd = torch.cat([bc * to_end, kc * to_end], dim=-2)                   # [.., 2C, K]
    Wk = torch.cat([-W, torch.zeros_like(W)], dim=-2)
    U = torch.cat([U0, vc], dim=-2)                                       # [.., 2C, V]
    return DplrChunks(layout=layout, k=kc, G=G, Kd=Kd, Wk=Wk, U=U, decay=G[..., -1, :].exp(), input_dtype=k.dtype,
                      b=bc)


def dplr_chunk_output(q, chunks: DplrChunks, entering: torch.Tensor, scale: float) -> torch.Tensor:
    """o per chunk from the entering states; q: [B, T, H, K], entering: [R, H, NC, K, V] -> o [B, T, H, V]
    (accumulation dtype)."""
    qc = to_chunks(q.to(chunks.k.dtype), chunks.layout)
    P = torch.cat([intra_scores_key(qc, chunks.b, chunks.G), intra_scores_key(qc, chunks.k, chunks.G)], dim=-1)
    return chunk_readout(qc * chunks.G.exp(), P, chunks, entering, scale)


def dplr_flops_per_token(chunk_size: int, key_dim: int, value_dim: int, chunks_per_row: int) -> tuple[float, float]:
    """(forward, backward) FLOPs per token and head of the chunked path above as FlopCounterMode counts them, for
    rows of chunks_per_row whole chunks: forward 7CK + 6CV + 10KV (the four pair-score blocks, A_ak V, the scan on
    2C rows, the read-out), backward 16CK + 14CV + 20KV less 20KV/NC at the row's edges (no gradient into the zero
    first state), plus 2KV when a row is one chunk. Fitted on K, V in {16, 32, 64} with unequal pairs and 1 to 8
    chunks per row, exact on each (tests/ops/test_dplr.py::test_flops_formula_is_what_flopcounter_counts)."""
    C, K, V, n = chunk_size, key_dim, value_dim, chunks_per_row
    return (7 * C * K + 6 * C * V + 10 * K * V,
            16 * C * K + 14 * C * V + 20 * K * V - 20 * K * V / n + (2 * K * V if n == 1 else 0))


def chunk_dplr_delta_rule(q, k, v, a, b, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
                          chunk_size: int = CHUNK_SIZE):
    """Arguments as `lsp.ops.dplr_delta_rule` (already validated); chunked forward, autograd backward."""
    chunks = prepare_dplr_chunks(k, v, a, b, g, cu_seqlens, chunk_size)
    init = None if initial_state is None else initial_state.to(chunks.U.dtype)
    entering, final = chunk_scan(chunks, chunks.U, init)
    o = dplr_chunk_output(q, chunks, entering, scale).to(q.dtype)
    return o, (final if output_final_state else None)
