r"""The (gated) delta rule in chunks of C tokens: the WY / UT representation, plain PyTorch, autograd backward.

Write the step as S_t = D_t S_{t-1} + k_t w_tᵀ with D_t = Diag(exp g_t) and w_t = beta_t (v_t - (D_t S_{t-1})ᵀ k_t);
g_t is one log-decay per head (D_t = exp(g_t) I) or one per key channel (Kimi Delta Attention). Inside a chunk
entered with state S, let G_i be the within-chunk cumulative log-decay (G_i <= 0 per channel, non-increasing) and
x ⊙ e^{G_i - G_j} y = Σ_d x_d y_d exp(G_id - G_jd) the decayed dot product (a plain product times exp(G_i - G_j) for
a gate per head):

    S_i = Diag(exp G_i) S + Σ_{j<=i} (exp(G_i - G_j) ⊙ k_j) w_jᵀ
    w_i = beta_i v_i - beta_i Sᵀ (exp(G_i) ⊙ k_i) - Σ_{j<i} beta_i (k_i ⊙ e^{G_i - G_j} k_j) w_j

so (I + A) W = diag(beta) V - (beta exp(G) ⊙ K) S with A_ij = beta_i (k_i ⊙ e^{G_i - G_j} k_j), j < i, unit lower
triangular on the left. One triangular solve per chunk (the UT transform, T = (I + A)^-1) gives

    U = T (beta ⊙ V)  [C, V],   Wk = T (beta exp(G) ⊙ K)  [C, K],   W = U - Wk S
    S_next = Diag(exp G_C) S + Kdᵀ (U - Wk S),            Kd_j = exp(G_C - G_j) ⊙ k_j
    o_i    = scale · [ (q_i ⊙ exp(G_i)) S + Σ_{j<=i} (q_i ⊙ e^{G_i - G_j} k_j) W_j ]

Every exponent is <= 0, so nothing overflows whatever the decay (for a gate per key the pair products go through
sub-blocks, `pair_products`). The chunk's map S -> M_c S + B_c is affine, M_c = Diag(exp G_C) - Kdᵀ Wk and
B_c = Kdᵀ U; `sequence_maps` composes it over a whole sequence (and every chunk
prefix) by running the same scan on the augmented state [M | S] (entered as [I | S_0], with U padded by K zero
columns). Sequence parallelism exchanges the sequences' [M | S] and then enters each chunk with S_c + P_c E in one
batched product (`enter_sequences`), without a second scan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lsp.names import CHUNK_SIZE
from lsp.ops.linear.checks import acc_dtype
from lsp.ops.linear.layout import ChunkLayout, chunk_layout

SUB_CHUNK = 16  # tokens per sub-block of the per-key pair products (`pair_products`)


@dataclass
class DeltaChunks:
    """The state-independent per-chunk quantities of one batch, shared by every scan over it."""

    layout: ChunkLayout
    k: torch.Tensor                # [R, H, NC, C, K] keys
    G: torch.Tensor | None         # [R, H, NC, C, 1] (gate per head) or [.., C, K] (per key) cumulative log-decay
    Kd: torch.Tensor               # [R, H, NC, C, K] keys decayed to the chunk end
    Wk: torch.Tensor               # [R, H, NC, C, K] T (beta exp(G) ⊙ K)
    U: torch.Tensor                # [R, H, NC, C, V] T (beta ⊙ V)
    decay: torch.Tensor | None     # [R, H, NC] (per head) or [R, H, NC, K] (per key) exp(G_C), the chunk's decay
    scan_backend: str = "torch"    # "triton": the chunk scan runs in one kernel (triton_scan.py)
    input_dtype: torch.dtype = torch.float32  # dtype of k, v (decides the Triton scan's product precision)

    def triton_scan(self, U: torch.Tensor, init: torch.Tensor | None):
        """`chunk_scan` with scan_backend="triton" (a family whose chunks have a structure the kernel can use
        overrides it: the DPLR chunks, lsp/ops/dplr/chunk.py)."""
        return _triton_scan(self, U, init)


def to_chunks(x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    # [B, T, H, D] -> [R, H, NC, C, D], zero padded
    x = layout.pad(x)
    R, Tp, H, D = x.shape
    C = layout.chunk_size
    return x.view(R, Tp // C, C, H, D).permute(0, 3, 1, 2, 4)


def from_chunks(x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    # [R, H, NC, C, D] -> [B, T, H, D]
    R, H, NC, C, D = x.shape
    return layout.unpad(x.permute(0, 2, 3, 1, 4).reshape(R, NC * C, H, D))


def _pair_decay(G: torch.Tensor | None, C: int, strict: bool, dtype, device) -> torch.Tensor:
    # G: [R, H, NC, C, 1] or None -> exp(G_i - G_j) on the causal pairs (j < i if strict, else j <= i), zero elsewhere
    mask = torch.ones(C, C, dtype=torch.bool, device=device).tril(-1 if strict else 0)
    if G is None:
        return mask.to(dtype)
    diff = G - G.transpose(-1, -2)
    return torch.where(mask, diff, float("-inf")).exp()


def pair_products(x: torch.Tensor, y: torch.Tensor, G: torch.Tensor | None, strict: bool) -> torch.Tensor:
    """P_ij = Σ_d x_id y_jd exp(G_id - G_jd) on the causal pairs (j < i if strict, else j <= i), zero elsewhere.

    x, y: [.., C, K]; G: [.., C, 1] (gate per head), [.., C, K] (per key) or None -> [.., C, C]. A gate per key cannot
    be pulled out of the dot product, and exp(G_i) · exp(-G_j) overflows fp32 once a chunk decays past e^-88, so
    the pairs go through sub-blocks of `SUB_CHUNK` tokens: a pair (i in block a, j before block a) factors through
    the log-decay R_a reached just before block a, exp(G_i - R_a) · exp(R_a - G_j), both exponents <= 0; a pair inside
    one block takes exp(G_i - G_j) per channel, one lag i - j at a time (never a [.., C, C, K] tensor).
    """
    C = x.shape[-2]
    if G is None or G.shape[-1] == 1:
        return (x @ y.transpose(-1, -2)) * _pair_decay(G, C, strict, x.dtype, x.device)
    c = math.gcd(C, SUB_CHUNK)
    n, lead, K = C // c, x.shape[:-2], x.shape[-1]
    Gb = G.reshape(*lead, n, c, K)
    ref = torch.cat([G.new_zeros(*lead, 1, K), G[..., c - 1 : C - 1 : c, :]], dim=-2)[..., None, :]  # [.., n, 1, K]
    x_in = x.reshape(*lead, n, c, K) * (Gb - ref).exp()                      # [.., n, c, K]
    y_out = y[..., None, :, :] * (ref - G[..., None, :, :]).clamp(max=0).exp()  # [.., n, C, K] (exact for j < a·c)
    earlier = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)      # block b before block a
    across = (x_in @ y_out.transpose(-1, -2)).reshape(*lead, n, c, n, c) * earlier[:, None, :, None]
    inside = _pairs_inside_blocks(x.reshape(*lead, n, c, K), y.reshape(*lead, n, c, K), Gb, strict)
    same = torch.eye(n, dtype=x.dtype, device=x.device)[:, None, :, None]    # [n, 1, n, 1]
    return (across + inside[..., :, :, None, :] * same).reshape(*lead, C, C)


def _pairs_inside_blocks(x, y, G, strict: bool) -> torch.Tensor:
    # x, y, G: [.., n, c, K] -> [.., n, c, c]: the pairs of `pair_products` inside each sub-block, one lag (i - j) at
    # a time, so that no [c, c, K] tensor (nor a masked exp of a positive exponent) is ever formed
    c = x.shape[-2]
    out = x.new_zeros(*x.shape[:-1], c)
    for lag in range(1 if strict else 0, c):
        near = (x[..., lag:, :] * y[..., : c - lag, :] * (G[..., lag:, :] - G[..., : c - lag, :]).exp()).sum(-1)
        out = out + torch.diag_embed(near, offset=-lag)                       # pairs (j + lag, j)
    return out


def prepare_chunks(k, v, beta, g, cu_seqlens=None, chunk_size: int = CHUNK_SIZE,
                   scan_backend: str = "torch") -> DeltaChunks:
    """Chunk the inputs and run the UT transform; k: [B, T, H, K], v: [B, T, H, V], beta: [B, T, H], g: None,
    [B, T, H] (a gate per head) or [B, T, H, K] (a gate per key channel).

    Padding (to whole chunks per packed sequence) is exact: k = v = beta = 0 and g = 0 make a token the identity map.
    """
    B, T, H, K = k.shape
    dt = acc_dtype(k.dtype)
    layout = chunk_layout(B, T, cu_seqlens, chunk_size, k.device)
    kc, vc = to_chunks(k.to(dt), layout), to_chunks(v.to(dt), layout)
    bc = to_chunks(beta.to(dt).unsqueeze(-1), layout)                        # [R, H, NC, C, 1]
    per_head = g is not None and g.dim() == 3
    G = None if g is None else to_chunks(g.to(dt).unsqueeze(-1) if per_head else g.to(dt), layout).cumsum(dim=3)
    A = bc * pair_products(kc, kc, G, strict=True)                            # strictly lower [.., C, C]
    rhs = torch.cat([bc * vc, bc * kc * (1.0 if G is None else G.exp())], dim=-1)
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    U, Wk = sol[..., : v.shape[-1]], sol[..., v.shape[-1]:]
    Kd = kc if G is None else kc * (G[..., -1:, :] - G).exp()
    decay = None if G is None else (G[..., -1, 0] if per_head else G[..., -1, :]).exp()
    return DeltaChunks(layout, kc, G, Kd, Wk, U, decay, scan_backend, k.dtype)


def chunk_scan(chunks: DeltaChunks, U: torch.Tensor, init: torch.Tensor | None):
    """States entering every chunk and the final state of every sequence, for the chunks' map with offsets U.

    U: [R, H, NC, C, D] (D = V for the state, K + V for the augmented map state); init: [R or N, H, K, D] or None.
    Returns entering [R, H, NC, K, D] and final [R or N, H, K, D].
    """
    layout = chunks.layout
    if chunks.scan_backend == "triton":
        return chunks.triton_scan(U, init)
    R, H, NC, C, D = U.shape
    K = chunks.k.shape[-1]
    packed = layout.dst is not None
    zero = U.new_zeros(R, H, K, D)
    # unbind once: autograd through per-chunk slices would allocate a zero-filled full-size gradient per slice
    Us, Wks, Kds = U.unbind(2), chunks.Wk.unbind(2), chunks.Kd.transpose(-1, -2).unbind(2)
    # a scalar decay [R, H, NC] or one per key channel [R, H, NC, K] (KDA, the DPLR chunks) scales the state's rows
    decays = None if chunks.decay is None else _as_state_factor(chunks.decay).unbind(2)
    finals, entering, state = {}, [], zero
    for c in range(NC):
        if c in layout.resets:
            n = layout.resets[c]
            state = zero if init is None else (init[n : n + 1] if packed else init)
        entering.append(state)
        corrected = Us[c] - Wks[c] @ state                                    # W = U - Wk S   [R, H, C, D]
        state = (state if decays is None else decays[c] * state) + Kds[c] @ corrected
        for n in layout.ends.get(c, []):
            finals[n] = state
    if not packed:
        return torch.stack(entering, dim=2), finals[-1]
    for n in layout.empty:
        finals[n] = zero[:1] if init is None else init[n : n + 1]
    return torch.stack(entering, dim=2), torch.cat([finals[n] for n in sorted(finals)], dim=0)


def _as_state_factor(decay: torch.Tensor) -> torch.Tensor:
    # the chunks' decay as a factor of states [.., K, D]: [R, H, NC] -> [R, H, NC, 1, 1]; [R, H, NC, K] -> [.., K, 1]
    return decay[..., None, None] if decay.dim() == 3 else decay[..., None]


def _triton_scan(chunks: DeltaChunks, U: torch.Tensor, init: torch.Tensor | None):
    # the same scan in one Triton kernel (a decay per head [R, H, NC] or per key channel [R, H, NC, K])
    from .custom_ops import delta_chunk_scan
    from .triton_scan import precision

    reset, end, n_seq = scan_tables(chunks.layout, U.device)
    return delta_chunk_scan(chunks.Kd, chunks.Wk, U, chunks.decay, init, reset, end, n_seq,
                            precision(chunks.input_dtype))


def scan_tables(layout: ChunkLayout, device):
    """(reset, end, n_seq): int32 [R, NC] tables of the sequence starting / ending at each chunk (-1 elsewhere).
    Packed: the layout's cached device tables (`ChunkLayout.chunk_tables`); unpacked: built on the device (row r
    is sequence r), so no call copies a table from the host."""
    if layout.dst is not None:
        return (*layout.chunk_tables(device), len(layout.resets) + len(layout.empty))
    R, NC = layout.rows, layout.num_chunks
    reset = torch.full((R, NC), -1, dtype=torch.int32, device=device)
    end = torch.full((R, NC), -1, dtype=torch.int32, device=device)
    reset[:, 0] = end[:, NC - 1] = torch.arange(R, dtype=torch.int32, device=device)
    return reset, end, R


def chunk_output(q, chunks: DeltaChunks, entering: torch.Tensor, scale: float) -> torch.Tensor:
    """o = scale · [(q ⊙ exp(G) - P Wk) E_c + P U] per chunk, P_ij = q_i ⊙ e^{G_i - G_j} k_j on j <= i.

    q: [B, T, H, K]; entering: [R, H, NC, K, V] -> o [B, T, H, V] in the accumulation dtype.
    """
    qc = to_chunks(q.to(chunks.k.dtype), chunks.layout)
    P = pair_products(qc, chunks.k, chunks.G, strict=False)
    q_state = qc if chunks.G is None else qc * chunks.G.exp()
    return chunk_readout(q_state, P, chunks, entering, scale)


def chunk_readout(q_state, P, chunks: DeltaChunks, entering: torch.Tensor, scale: float) -> torch.Tensor:
    """o = scale · [(q_state - P Wk) E_c + P U]: the output of any chunk map in this form, whatever made P.

    q_state: [R, H, NC, C, K] queries decayed from the chunk start; P: [R, H, NC, C, C'] (C' = U's rows);
    entering: [R, H, NC, K, V] -> o [B, T, H, V] in the accumulation dtype.
    """
    o = scale * (P @ chunks.U + (q_state - P @ chunks.Wk) @ entering)
    return from_chunks(o, chunks.layout)


def sequence_maps(chunks: DeltaChunks, init: torch.Tensor | None = None):
    """The affine state map of every sequence and of every chunk's prefix, for a later entering state.

    Runs the chunk scan on the augmented state [M | S], entered as [I | init] (init zero when None). Returns
    entering [R, H, NC, K, K + V] (per chunk: [P_c | S_c], the chunk is entered with S_c + P_c X when the sequence
    is entered with init + X) and final [R or N, H, K, K + V] = [M | S_loc] per sequence. Differentiable.
    """
    R, H, NC, C, _ = chunks.U.shape          # C: U's rows (twice the chunk for DPLR: its low-rank and kv terms)
    K = chunks.k.shape[-1]
    U_aug = torch.cat([chunks.U.new_zeros(R, H, NC, C, K), chunks.U], dim=-1)
    n_seq = R if chunks.layout.dst is None else len(chunks.layout.resets) + len(chunks.layout.empty)
    eye = torch.eye(K, dtype=U_aug.dtype, device=U_aug.device).expand(n_seq, H, K, K)
    state0 = U_aug.new_zeros(n_seq, H, K, chunks.U.shape[-1]) if init is None else init.to(U_aug.dtype)
    return chunk_scan(chunks, U_aug, torch.cat([eye, state0], dim=-1))


def enter_sequences(chunks: DeltaChunks, entering_aug, final_aug, extra: torch.Tensor):
    """Chunk entering states and final states when every sequence is entered with init + extra (one batched
    product, no scan): S_c + P_c X and S_loc + M X.

    entering_aug, final_aug: from `sequence_maps`; extra: [R or N, H, K, V]. Returns [R, H, NC, K, V], [R or N, ..].
    """
    K = chunks.k.shape[-1]
    layout = chunks.layout
    if layout.dst is None:
        per_chunk = extra[:, :, None]                                          # [R, H, 1, K, V]
    else:
        owner = torch.zeros(layout.num_chunks, dtype=torch.long, device=extra.device)
        for c, n in layout.resets.items():                                    # chunks of sequence n follow its reset
            owner[c:] = n
        per_chunk = extra.index_select(0, owner).transpose(0, 1)[None]       # [1, H, NC, K, V]
    entering = entering_aug[..., K:] + entering_aug[..., :K] @ per_chunk
    return entering, final_aug[..., K:] + final_aug[..., :K] @ extra


def repeat_heads(x: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """[B, T, H, K] -> [B, T, G·H, K]: value head j reads q/k head j // G (autograd sums the G copies' gradients)."""
    return x if x is None or groups == 1 else x.repeat_interleave(groups, dim=2)


def chunk_delta_rule(q, k, v, beta, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
                     chunk_size: int = CHUNK_SIZE, scan_backend: str = "torch"):
    """Arguments as `lsp.ops.delta_rule` (already validated; q, k at H heads, v and the rest at HV = G·H). "torch":
    `chunk_forward` on q, k repeated per value head, autograd backward; "triton": forward and backward in Triton
    kernels (triton_chunk.py), which read q/k head j // G for value head j, except for fp64 inputs with a gate per
    key (the per-key pair products are the linear op's 16-row kernels, fp32 accumulators): `chunk_forward` with the
    Triton scan, fp64 throughout."""
    fp64_key = g is not None and g.dim() == 4 and q.dtype == torch.float64
    if scan_backend == "triton" and chunk_size == CHUNK_SIZE and not fp64_key:
        from .triton_chunk import triton_delta_rule

        return triton_delta_rule(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens)
    groups = v.shape[2] // q.shape[2]
    return chunk_forward(repeat_heads(q, groups), repeat_heads(k, groups), v, beta, g, scale, initial_state,
                         output_final_state, cu_seqlens, chunk_size, scan_backend)


def chunk_forward(q, k, v, beta, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
                  chunk_size: int = CHUNK_SIZE, scan_backend: str = "torch"):
    """Chunked forward in batched torch ops (the scan in Triton with scan_backend="triton"), autograd backward."""
    chunks = prepare_chunks(k, v, beta, g, cu_seqlens, chunk_size, scan_backend)
    init = None if initial_state is None else initial_state.to(chunks.U.dtype)
    entering, final = chunk_scan(chunks, chunks.U, init)
    o = chunk_output(q, chunks, entering, scale).to(q.dtype)
    return o, (final if output_final_state else None)
