"""`delta_rule`: one public function in front of the naive and chunked-torch delta-rule backends."""
from __future__ import annotations

import torch

from lsp.ops import probe
from lsp.ops.estimate import gpu_code_paths_active
from lsp.ops.linear.api import triton_available
from lsp.ops.linear.checks import check_linear_inputs

from .chunk import chunk_delta_rule
from .naive import naive_delta_rule

DELTA_BACKENDS = ("auto", "torch", "triton", "naive")


def check_delta_inputs(q, k, v, beta, g, initial_state, cu_seqlens) -> None:
    """Validate `delta_rule`'s arguments: those of `linear_attention`, with beta [B, T, H] and g None or [B, T, H]."""
    B, T, H = q.shape[:3] if isinstance(q, torch.Tensor) and q.dim() == 4 else (None,) * 3
    if g is not None and (not isinstance(g, torch.Tensor) or tuple(g.shape) != (B, T, H)):
        got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"g (log-decay) must be None or [B, T, H]=[{B}, {T}, {H}] for the delta rule, got {got}")
    check_linear_inputs(q, k, v, g, initial_state, cu_seqlens)
    if not isinstance(beta, torch.Tensor) or not beta.is_floating_point() or tuple(beta.shape) != (B, T, H):
        got = tuple(beta.shape) if isinstance(beta, torch.Tensor) else type(beta).__name__
        raise ValueError(f"beta must be a floating tensor [B, T, H]=[{B}, {T}, {H}], got {got}")
    if beta.device != q.device:
        raise ValueError(f"beta is on {beta.device} but q is on {q.device}")


def resolve_delta_backend(backend: str, device: torch.device, case=None) -> str:
    """"auto": the Triton kernels on CUDA once they passed the first-use probe for `case`
    (`lsp.ops.probe.kernel_case("delta_rule", k, v, g)`; lsp/ops/probe.py), else the chunked torch path."""
    if backend not in DELTA_BACKENDS:
        raise ValueError(f"backend must be one of {DELTA_BACKENDS} for delta_rule, got {backend!r}")
    if backend == "triton" and not triton_available(device):
        raise ValueError(f"backend='triton' needs a CUDA device or TRITON_INTERPRET=1 (inputs are on {device})")
    if backend != "auto":
        return backend
    if case is None or gpu_code_paths_active() or not probe.kernels_by_default(device):
        return "torch"                          # fake-tensor measurement: no delta custom ops (fake kernels) yet
    return probe.probed_backend(case)


def delta_rule(q, k, v, beta, g=None, *, scale=None, initial_state=None, output_final_state=False,
               cu_seqlens=None, backend="auto"):
    r"""Causal (gated) delta rule.

    Per batch row (or packed sequence) and head, with S_0 = initial_state or 0 and S of shape [K, V]:

        S_t = exp(g_t) (I - beta_t k_tᵀ k_t) S_{t-1} + beta_t k_tᵀ v_t,        o_t = scale · q_t S_t

    Keys are used as given (a model L2-normalises them; with |k| = 1 and beta in (0, 2) the map is contractive).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (K, V <= 256; any T). beta: [B, T, H] write strength.
        g: None (DeltaNet) or [B, T, H] log-decay <= 0 (Gated DeltaNet).
        scale: defaults to K ** -0.5.
        initial_state: [B, H, K, V] ([N, H, K, V] with cu_seqlens), fp32 (fp64 for fp64 inputs).
        output_final_state: also return the state after the last token (of every packed sequence).
        cu_seqlens: int32 [N + 1] cumulative lengths of packed sequences (B == 1); the state resets at each start.
        backend: "auto" (Triton on CUDA once its first-use probe passed, lsp/ops/probe.py; else "torch"),
            "torch" (chunked WY/UT, any device), "triton" (the same algorithm in Triton
            kernels, forward and backward; CUDA or TRITON_INTERPRET=1) or "naive" (the reference).

    Returns:
        o: [B, T, H, V] in q's dtype; final_state: [B or N, H, K, V] in the accumulation dtype, or None.
        The state math runs in fp32 (fp64 for fp64 inputs) whatever an enclosing torch.autocast says.
    """
    check_delta_inputs(q, k, v, beta, g, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    name = resolve_delta_backend(backend, q.device, probe.kernel_case("delta_rule", k, v, g))
    with torch.autocast(device_type=q.device.type, enabled=False):
        if name == "naive":
            return naive_delta_rule(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens)
        return chunk_delta_rule(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens,
                                scan_backend=name)
