r"""`sp_dplr_delta_rule`: exact sequence-parallel diagonal-plus-low-rank delta rule (RWKV-7).

A segment's state map is affine, S ↦ M S + S_loc, with M = Π (Diag(exp g_t) + b_t a_tᵀ) (K × K, dense): the dense
family of lsp.parallel.affine, exactly as for the delta rule. The DPLR chunks (lsp/ops/dplr/chunk.py) are in the
delta rule's chunk form, so the whole SP pass — maps by the augmented chunk scan, the registered method's exchange,
one batched entering product, final states — is lsp.parallel.delta's `sp_chunked_rule`; only the chunk preparation
and the output read-out are the DPLR's. No method code of its own. backend="triton" runs the chunk scans (local
maps and entering states) in the delta rule's Triton scan, as `sp_delta_rule` does.
"""
from __future__ import annotations

import torch

from lsp.ops.dplr import check_dplr_inputs, dplr_chunk_output, dplr_delta_rule, prepare_dplr_chunks
from lsp.ops.dplr.api import resolve_dplr_backend
from lsp.ops.probe import kernel_case

from .context import SPContext
from .delta import sp_chunked_rule
from .linear import Shape, _check


def sp_dplr_delta_rule(q, k, v, a, b, g, *, sp, method=None, scale=None, initial_state=None,
                       output_final_state=False, cu_seqlens=None, backend="auto", scan_blocks=None):
    r"""Sequence-parallel DPLR delta rule; equals `lsp.ops.dplr_delta_rule` on the gathered sequence.

    Recurrence (per batch row / document and head): S_t = Diag(exp g_t) S_{t−1} + b_t (a_tᵀ S_{t−1}) + k_t v_tᵀ,
    o_t = scale · q_tᵀ S_t.

    Args:
        q, k, a, b, g: [R·B, T_local, H, K]; v: [R·B, T_local, H, V]: local shards from `sp.shard` (R = W emulated,
            1 real).
        sp: the SPContext. method: None (the context's) or a registered SP method (`lsp.parallel.sp_methods()`);
            All-Scan cuts the state into `scan_blocks` blocks along V.
        initial_state: [B, H, K, V] ([N, H, K, V] with cu_seqlens) on every rank; its gradient lands on the rank
            holding the first token of each sequence.
        output_final_state: the state after the last token of every sequence, on every rank ([B or N, H, K, V];
            emulated [R·(B or N), H, K, V]). Use it in the loss on every rank or on none (its backward is a
            collective).
        cu_seqlens: GLOBAL int32 [N + 1] boundaries of packed documents (B == 1).
        backend: "auto" / "torch" (the chunked path) or "triton" (its chunk scan in the delta rule's Triton scan,
            `lsp::delta_chunk_scan`; the WY solve and the outputs stay batched torch ops); not "naive".

    Returns:
        o_local [R·B, T_local, H, V] in q's dtype, final_state or None.
    """
    if not isinstance(sp, SPContext):
        raise ValueError(f"sp must be an lsp.parallel.SPContext, got {type(sp).__name__}")
    if resolve_dplr_backend(backend, q.device) == "naive":     # an unknown name raises here
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton' under sequence parallelism, got {backend!r}")
    method = sp.method if method is None else method
    scan_blocks = sp.scan_blocks if scan_blocks is None else scan_blocks
    check_dplr_inputs(q, k, v, a, b, g, None, None)
    R, L = sp.rows, sp.segments_per_rank
    s = Shape(R, L, q.shape[0] // R, sp.segment_length(q.shape[1]), q.shape[2], q.shape[3], v.shape[-1])
    _check(q, sp, method, initial_state, cu_seqlens, s)
    scale = s.K ** -0.5 if scale is None else scale
    if sp.world_size == 1:  # both layouts hold the whole sequence in order: the op itself, no map to compose
        return dplr_delta_rule(q, k, v, a, b, g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=backend)
    with torch.autocast(device_type=q.device.type, enabled=False):
        name = resolve_dplr_backend(backend, q.device, kernel_case("dplr_delta_rule", k, v, g))
        scan = "triton" if name == "triton" else "torch"
        prepare = lambda rows, cu: prepare_dplr_chunks(*rows, cu, scan_backend=scan)  # noqa: E731
        return sp_chunked_rule(q, (k, v, a, b, g), prepare, dplr_chunk_output, "dplr", sp, method, scale,
                               initial_state, output_final_state, cu_seqlens, scan_blocks, s)
