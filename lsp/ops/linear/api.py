"""`linear_attention`: one public function in front of the naive, chunked-torch and Triton backends."""
from __future__ import annotations

import torch

from lsp.names import KERNEL_BACKENDS

from .. import probe
from .checks import broadcast_decay, check_linear_inputs, exact_numerics
from .chunk import chunk_linear_attention
from .naive import naive_linear_attention

BACKENDS = KERNEL_BACKENDS


def resolve_backend(backend: str, device: torch.device, case=None) -> str:
    """The backend a call runs on (`lsp.ops.probe.resolve_kernel_backend`): "auto" is the Triton kernels on CUDA once
    they passed the first-use probe for `case` (`lsp.ops.probe.kernel_case` of the call), else the chunked torch
    path."""
    return probe.resolve_kernel_backend("linear_attention", backend, device, case, BACKENDS)


def linear_attention(q, k, v, g=None, *, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, backend="auto"):
    r"""Causal linear attention with optional decay.

    Per batch row (or packed sequence) and head, with S_0 = initial_state or 0:

        S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t,        o_t = scale · q_t S_t

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (K, V <= 256; any T).
        g: log-decay (<= 0): None, [H] (fixed per head), [B, T, H] (scalar per token and head) or [B, T, H, K].
        scale: defaults to K ** -0.5.
        initial_state: [B, H, K, V] ([N, H, K, V] with cu_seqlens), fp32 (fp64 for fp64 inputs).
        output_final_state: also return the state after the last token (of every packed sequence).
        cu_seqlens: int32 [N + 1] cumulative lengths of packed sequences (B == 1); the state resets at each start.
        backend: "auto" (Triton on CUDA once its first-use probe passed, lsp/ops/probe.py; chunked torch
            elsewhere), "torch", "triton" or "naive".

    Returns:
        o: [B, T, H, V] in q's dtype; final_state: [B or N, H, K, V] in the accumulation dtype, or None.
    """
    form = check_linear_inputs(q, k, v, g, initial_state, cu_seqlens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    g4 = broadcast_decay(g, form)
    name = resolve_backend(backend, q.device, probe.kernel_case("linear_attention", k, v, g))
    if name == "naive":
        fn = naive_linear_attention
    elif name == "torch":
        fn = chunk_linear_attention
    else:
        from .triton_chunk import triton_linear_attention as fn
    with exact_numerics(q):
        return fn(q, k, v, g4, scale, initial_state, output_final_state, cu_seqlens)
