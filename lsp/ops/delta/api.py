"""`delta_rule`: one public function in front of the naive and chunked-torch delta-rule backends."""
from __future__ import annotations

import torch

from lsp.ops import probe
from lsp.ops.linear.checks import check_linear_inputs

from .chunk import chunk_delta_rule, repeat_heads
from .naive import naive_delta_rule

DELTA_BACKENDS = ("auto", "torch", "triton", "naive")


def value_groups(q, v) -> int:
    """G = HV // H, the value heads per q/k head (grouped value heads); one ValueError when HV is not a multiple."""
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, v)):
        return 1  # check_linear_inputs names the malformed argument
    H, HV = q.shape[2], v.shape[2]
    if H == 0 or HV == 0 or HV % H:
        raise ValueError(f"v's heads HV={HV} must be a multiple G·H of the H={H} heads of q and k (grouped value "
                         f"heads): q {tuple(q.shape)}, v {tuple(v.shape)}")
    return HV // H


def check_delta_inputs(q, k, v, beta, g, initial_state, cu_seqlens) -> int:
    """Validate `delta_rule`'s arguments and return G (value heads per q/k head): those of `linear_attention` with
    HV = G·H value heads (v, beta, g, the states), beta [B, T, HV] and g None, [B, T, HV] or [B, T, HV, K]."""
    groups = value_groups(q, v)
    check_linear_inputs(q, k, v[:, :, ::groups] if groups > 1 else v, None, None, None)
    B, T, H, K = q.shape
    HV = v.shape[2]
    if g is not None and (not isinstance(g, torch.Tensor) or tuple(g.shape) not in ((B, T, HV), (B, T, HV, K))):
        got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"g (log-decay) must be None, [B, T, HV]=[{B}, {T}, {HV}] or [B, T, HV, K]="
                         f"[{B}, {T}, {HV}, {K}] for the delta rule, got {got}")
    per_value_head = q[:, :, :1].expand(B, T, HV, K)  # a view: g and the states are checked against HV heads
    check_linear_inputs(per_value_head, per_value_head, v, g, initial_state, cu_seqlens)
    if not isinstance(beta, torch.Tensor) or not beta.is_floating_point() or tuple(beta.shape) != (B, T, HV):
        got = tuple(beta.shape) if isinstance(beta, torch.Tensor) else type(beta).__name__
        raise ValueError(f"beta must be a floating tensor [B, T, HV]=[{B}, {T}, {HV}], got {got}")
    if beta.device != q.device:
        raise ValueError(f"beta is on {beta.device} but q is on {q.device}")
    return groups


def resolve_delta_backend(backend: str, device: torch.device, case=None) -> str:
    """`lsp.ops.probe.resolve_kernel_backend` for the delta rule: "auto" is the Triton kernels on CUDA once they
    passed the first-use probe for `case` (`lsp.ops.probe.kernel_case("delta_rule", k, v, g)`), else the chunked
    torch path; under `lsp.ops.estimate.gpu_code_paths()` the kernels' custom ops (custom_ops.py). The kernels take
    every gate form: none, one per head, one per key channel (KDA, `case.form == "key"`)."""
    return probe.resolve_kernel_backend("delta_rule", backend, device, case, DELTA_BACKENDS)


def delta_rule(q, k, v, beta, g=None, *, scale=None, initial_state=None, output_final_state=False,
               cu_seqlens=None, backend="auto"):
    r"""Causal (gated) delta rule, with a gate per head (Gated DeltaNet) or per key channel (Kimi Delta Attention).

    Per batch row (or packed sequence) and value head, with S_0 = initial_state or 0 and S of shape [K, V]:

        S_t = (I - beta_t k_t k_tᵀ) Diag(exp g_t) S_{t-1} + beta_t k_t v_tᵀ,        o_t = scale · q_t S_t

    (a gate per head is Diag(exp g_t) = exp(g_t) I). Value head j reads q/k head j // G (grouped value heads).
    Keys are used as given (a model L2-normalises them; with |k| = 1 and beta in (0, 2) the map is contractive).

    Args:
        q, k: [B, T, H, K]; v: [B, T, HV, V] with HV = G·H (K, V <= 256; any T). beta: [B, T, HV] write strength.
        g: None (DeltaNet), [B, T, HV] (Gated DeltaNet) or [B, T, HV, K] (KDA) log-decay <= 0.
        scale: defaults to K ** -0.5.
        initial_state: [B, HV, K, V] ([N, HV, K, V] with cu_seqlens), fp32 (fp64 for fp64 inputs).
        output_final_state: also return the state after the last token (of every packed sequence).
        cu_seqlens: int32 [N + 1] cumulative lengths of packed sequences (B == 1); the state resets at each start.
        backend: "auto" (Triton on CUDA once its first-use probe passed, lsp/ops/probe.py; else "torch"), "torch"
            (chunked WY/UT, any device), "triton" (the same algorithm in Triton kernels, forward and backward; CUDA
            or TRITON_INTERPRET=1; fp64 inputs with a gate per key run the torch path's chunk math with the Triton
            scan, as the linear op's per-key kernels accumulate in fp32) or "naive" (the reference).

    Returns:
        o: [B, T, HV, V] in q's dtype; final_state: [B or N, HV, K, V] in the accumulation dtype, or None.
        The state math runs in fp32 (fp64 for fp64 inputs) whatever an enclosing torch.autocast says.
    """
    groups = check_delta_inputs(q, k, v, beta, g, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    name = resolve_delta_backend(backend, q.device, probe.kernel_case("delta_rule", k, v, g))
    with torch.autocast(device_type=q.device.type, enabled=False):
        if name == "naive":
            return naive_delta_rule(repeat_heads(q, groups), repeat_heads(k, groups), v, beta, g, scale,
                                    initial_state, output_final_state, cu_seqlens)
        # the chunked paths take q, k at their H heads (the Triton kernels index head j // G; torch repeats them)
        return chunk_delta_rule(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens,
                                scan_backend=name)
