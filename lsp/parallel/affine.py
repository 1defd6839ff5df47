r"""The algebra every SP method of the linear layers is written over: a segment maps its entering state affinely.

A segment i of any linear layer, run from a zero entering state, yields its local state S_i (`[B, H, K, V]`) and a
map A_i acting on K only, so that the state leaving it is

    S_out = A_i · S_in + S_i,        A_i = p_i · (identity | exp(a)·I | Diag(exp a) | M_i)

(p_i = 0 when a document starts strictly inside segment i: the entering state does not survive it). The entering
states E of the segments obey E_0 = 0, E_{i+1} = c_{i+1} · (A_i E_i + S_i) (c_{i+1} = 0 when a document starts
exactly at segment i+1), and the gradients flow back through the transposed maps: G_i = gE_i + c_{i+1} A_iᵀ G_{i+1},
∂S_i = c_{i+1} G_{i+1}, ∂A_i = c_{i+1} G_{i+1} E_iᵀ. Composition (A₂, B₂)∘(A₁, B₁) = (A₂A₁, A₂B₁ + B₂) is `apply`
of one map to the other.

A family says how its map is held and travels; the methods (lsp.parallel.allgather, lsp.parallel.chain) use only
this interface:

* `param`: what the layer hands the exchange per segment, `[R, L, B, H, ...]`, and what its gradient is for: the total
  log-decay a (`[.., Kg]`, Kg = 1 scalar, K per key, or None: no decay) for `DIAGONAL`, the K × K matrix for `DENSE`
  (delta rule, KDA, DPLR: the ordered product of the tokens' transitions, per-key gates included).
* `map(P_i, p_i, like)`: A_i as a tensor that `apply` takes (`[B, H, Kg or 1, 1]` or `[B, H, K, K]`).
* `apply(A, X, transpose)`: A·X (or Aᵀ·X) for X a state `[B, H, K, V']` (any block of V columns: A never mixes
  V columns) or another map (composition).
* `identity(P_i, like)`: the identity map in `map`'s form (the start of a composed product).
* `grad(P_i, A_i, X, E_i, p_i)`: ∂P_i from X = c_{i+1} G_{i+1} and E_i.

A scalar or diagonal map travels as its vector (K or 1 numbers per head); a dense one as K × K.
"""
from __future__ import annotations

import torch


def _decay(a_i, pass_i: float):
    # a_i: [B, H, Kg] or None -> A_i broadcastable to [B, H, K, V]: p_i · exp(a_i), or p_i without decay
    if a_i is None:
        return float(pass_i)
    return pass_i * a_i.exp()[..., None]


class DiagonalMaps:
    """A_i = p_i · Diag(exp a_i): no decay (a None), one decay per head (Kg = 1) or per key channel (Kg = K)."""

    name = "diagonal"

    @staticmethod
    def map(P_i, p_i: float, like: torch.Tensor) -> torch.Tensor:
        # P_i: [B, H, Kg] or None; like: [B, H, K, V] -> [B, H, Kg or 1, 1]
        A = _decay(P_i, p_i)
        return like.new_full((*like.shape[:2], 1, 1), A) if not isinstance(A, torch.Tensor) else A

    @staticmethod
    def apply(A, X, transpose: bool = False):
        # a diagonal is its own transpose
        return A * X

    @staticmethod
    def identity(P_i, like: torch.Tensor) -> torch.Tensor:
        return like.new_ones(*like.shape[:2], 1 if P_i is None else P_i.shape[-1], 1)

    @staticmethod
    def grad(P_i, A_i, X, E_i, p_i: float):
        # ∂a_i = Σ_v (X ⊙ E_i) ⊙ A_i (summed over K too for a per-head decay); None without decay
        if P_i is None:
            return None
        gA = (X * E_i).sum(-1)
        if P_i.shape[-1] == 1:
            gA = gA.sum(-1, keepdim=True)
        return (gA * A_i[..., 0]).to(P_i.dtype)


class DenseMaps:
    """A_i = p_i · M_i with M_i a K × K matrix (delta rule, gated delta rule, KDA, DPLR)."""

    name = "dense"

    @staticmethod
    def map(P_i, p_i: float, like: torch.Tensor) -> torch.Tensor:
        # P_i: [B, H, K, K] -> [B, H, K, K]
        return P_i if p_i else torch.zeros_like(P_i)

    @staticmethod
    def apply(A, X, transpose: bool = False):
        return (A.transpose(-1, -2) if transpose else A) @ X

    @staticmethod
    def identity(P_i, like: torch.Tensor) -> torch.Tensor:
        K = P_i.shape[-1]
        return torch.eye(K, dtype=like.dtype, device=like.device).expand(*like.shape[:2], K, K).clone()

    @staticmethod
    def grad(P_i, A_i, X, E_i, p_i: float):
        # ∂M_i = p_i · X E_iᵀ
        return X @ E_i.transpose(-1, -2) if p_i else torch.zeros_like(P_i)


DIAGONAL = DiagonalMaps()
DENSE = DenseMaps()


def pack(S, P):
    # S: [R, L, B, H, K, V]; P: [R, L, B, H, ...] or None -> [R, n]: one flat buffer (one collective)
    R = S.shape[0]
    parts = [S.reshape(R, -1)] + ([] if P is None else [P.to(S.dtype).reshape(R, -1)])
    return torch.cat(parts, dim=1)


def unpack(buf, S_shape, P_shape, P_dtype):
    # inverse of pack for the gathered [W, n] buffer -> S [W, L, ...], P [W, L, ...] or None
    W, nS = buf.shape[0], 1
    for d in S_shape[1:]:
        nS *= d
    S = buf[:, :nS].reshape(W, *S_shape[1:])
    P = None if P_shape is None else buf[:, nS:].reshape(W, *P_shape[1:]).to(P_dtype)
    return S, P


__all__ = ["DiagonalMaps", "DenseMaps", "DIAGONAL", "DENSE", "pack", "unpack"]
