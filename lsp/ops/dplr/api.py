"""`dplr_delta_rule`: one public function in front of the naive, chunked-torch and Triton DPLR backends."""
from __future__ import annotations

import torch

from lsp.ops import probe
from lsp.ops.linear.checks import check_linear_inputs

from .chunk import chunk_dplr_delta_rule
from .naive import naive_dplr_delta_rule


def _triton(*args):
    from .triton_chunk import triton_dplr_delta_rule  # imports triton: only when the backend runs

    return triton_dplr_delta_rule(*args)


# "auto" is resolved to one of the others (`resolve_dplr_backend`); an unknown name gets the one-line error
DPLR_BACKENDS = {"auto": None, "torch": chunk_dplr_delta_rule, "triton": _triton, "naive": naive_dplr_delta_rule}


def check_dplr_inputs(q, k, v, a, b, g, initial_state, cu_seqlens) -> None:
    """Validate `dplr_delta_rule`'s arguments: those of `linear_attention`, with a, b, g of q's shape [B, T, H, K]."""
    check_linear_inputs(q, k, v, None, initial_state, cu_seqlens)
    for name, x in (("a", a), ("b", b), ("g", g)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.shape != q.shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a floating tensor of q's shape [B, T, H, K]={list(q.shape)}, got {got}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")


def resolve_dplr_backend(backend: str, device: torch.device, case=None) -> str:
    """`lsp.ops.probe.resolve_kernel_backend` for the DPLR rule: "auto" is the Triton kernels on CUDA once they
    passed the first-use probe for `case` (`probe.kernel_case("dplr_delta_rule", k, v, g)`), under
    `lsp.ops.estimate.gpu_code_paths()` the custom op (it runs on fake tensors), else the chunked torch path."""
    return probe.resolve_kernel_backend("dplr_delta_rule", backend, device, case, DPLR_BACKENDS)


def dplr_delta_rule(q, k, v, a, b, g, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                    backend="auto"):
    r"""Causal diagonal-plus-low-rank delta rule (RWKV-7's state update).

    Per batch row (or packed sequence) and head, with S_0 = initial_state or 0 and S of shape [K, V]:

        S_t = Diag(exp g_t) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ,        o_t = scale · q_tᵀ S_t

    (a reads the state before the decay, as in fla's `chunk_dplr_delta_rule`). With b = 0 this is gated linear
    attention (`linear_attention` with g [B, T, H, K]); RWKV-7 uses a = -κ̂, b = κ̂ ⊙ α.

    Args:
        q, k, a, b: [B, T, H, K]; v: [B, T, H, V] (K, V <= 256; any T). g: [B, T, H, K] log-decay (<= 0).
        scale: defaults to K ** -0.5.
        initial_state: [B, H, K, V] ([N, H, K, V] with cu_seqlens), fp32 (fp64 for fp64 inputs).
        output_final_state: also return the state after the last token (of every packed sequence).
        cu_seqlens: int32 [N + 1] cumulative lengths of packed sequences (B == 1); the state resets at each start.
        backend: "auto" (Triton on CUDA once its first-use probe passed, lsp/ops/probe.py; else "torch"), "torch"
            (chunked WY form, any device), "triton" (its per-chunk work in Triton kernels, triton_chunk.py; CUDA or
            TRITON_INTERPRET=1; fp64 inputs run "torch") or "naive" (the reference).

    Returns:
        o: [B, T, H, V] in q's dtype; final_state: [B or N, H, K, V] in the accumulation dtype, or None.
        The state math runs in fp32 (fp64 for fp64 inputs) whatever an enclosing torch.autocast says.
    """
    probe.check_backend_name("dplr_delta_rule", backend, DPLR_BACKENDS)   # before the inputs are read
    check_dplr_inputs(q, k, v, a, b, g, initial_state, cu_seqlens)
    fn = DPLR_BACKENDS[resolve_dplr_backend(backend, q.device, probe.kernel_case("dplr_delta_rule", k, v, g))]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(device_type=q.device.type, enabled=False):
        return fn(q, k, v, a, b, g, scale, initial_state, output_final_state, cu_seqlens)
