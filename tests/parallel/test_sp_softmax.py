"""sp_softmax_attention (LASP-2H) equals single-device softmax attention (emulated and real gloo ranks), mask-free
with packed documents; zigzag balances FLOPs; the K|V gradient is reduce-scattered."""
import itertools

import pytest
import torch

import lsp.parallel.softmax as sp_softmax_module
from lsp.ops.softmax import document_mask, sdpa
from lsp.parallel import (
    LAYOUTS,
    SPContext,
    attention_flops_balance,
    comm_stats,
    reset_comm_stats,
    sp_softmax_attention,
    spawn,
)
from lsp.parallel.comm import EmuComm

from ..ops.test_softmax import LargestTensor
from ..ops.test_softmax import reference as explicit_reference
from .cases import make_softmax_case, max_rel_err, run_sp_softmax, softmax_reference


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_softmax_matches_single_device(W):
    for varlen in (False, True):
        for causal in (True, False):
            case = make_softmax_case(W, varlen)  # GQA: 4 query heads over 2 kv heads
            ref = softmax_reference(case, causal)
            for layout in ("contiguous", "zigzag"):
                err = max_rel_err(run_sp_softmax(case, SPContext(emulate=W, layout=layout), causal), ref)
                assert max(err.values()) < 1e-10, (W, varlen, causal, layout, err)


def test_softmax_negative_control_ignoring_documents_fails():
    case = make_softmax_case(2, True)
    ref = softmax_reference(case)
    got = run_sp_softmax(dict(case, cu=None), SPContext(emulate=2, layout="zigzag"))
    assert (got["o"] - ref["o"]).abs().max() > 1e-3


def test_softmax_kv_bytes():
    W = 4
    case = make_softmax_case(W, False, dtype=torch.float32)
    reset_comm_stats()
    run_sp_softmax(case, SPContext(emulate=W, layout="zigzag"))
    B, T_local, Hkv, D = 2, 16, 2, 8
    recv = comm_stats()["by_tag_op"]["softmax_kv/all_gather"]["bytes_recv"]
    assert recv / W == (W - 1) * 2 * B * T_local * Hkv * D * 4


def test_flop_balance():
    for W in (2, 4, 8):
        _, _, zig = attention_flops_balance(W, "zigzag", 256 * W)
        _, _, cont = attention_flops_balance(W, "contiguous", 256 * W)
        assert zig == pytest.approx(1.0, abs=1e-9)
        assert cont == pytest.approx(2 * W - 1, rel=0.01)


def test_softmax_method_error():
    sp = SPContext(emulate=2)
    q = torch.randn(2, 4, 2, 8)
    with pytest.raises(ValueError, match="method"):
        sp_softmax_attention(q, q, q, sp=sp, method="lasp2h")


def packed_case(W, T_local=24, H=4, Hkv=2, D=8, dtype=torch.float64, seed=5):
    """Documents crossing rank and zigzag segment edges (and the zigzag midpoint), a run of equal-length documents
    (batched into one kernel call), and one document spanning several segments."""
    T = W * T_local
    inner = {1, 3, 5, 7, 9, T // 2 + 1, T - 9, T - 4}
    case = make_softmax_case(W, True, dtype=dtype, seed=seed, T_per_rank=T_local, H=H, Hkv=Hkv, D=D)
    case["cu"] = torch.tensor(sorted({0, T} | {b for b in inner if 0 < b < T}), dtype=torch.int32)
    return case


def explicit(case, causal=True):
    """Outputs and q, k, v gradients of the explicit fp64 softmax(QKᵀ) V with the document / causal mask."""
    x = {n: case[n].clone().requires_grad_() for n in ("q", "k", "v")}
    o = explicit_reference(x["q"], x["k"], x["v"], causal, case["cu"])
    (o * case["wo"]).sum().backward()
    return {"o": o.detach(), **{n: t.grad for n, t in x.items()}}


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_packed_documents_match_explicit_reference(W):
    """Mask-free packed path, both layouts, causal and not, GQA 4:2 and 4:1: outputs and gradients in fp64."""
    for layout, causal, Hkv in itertools.product(LAYOUTS, (True, False), (2, 1)):
        case = packed_case(W, Hkv=Hkv)
        err = max_rel_err(run_sp_softmax(case, SPContext(emulate=W, layout=layout), causal), explicit(case, causal))
        assert max(err.values()) < 1e-10, (layout, causal, Hkv, err)


def test_piece_attending_one_token_of_previous_document_fails(monkeypatch):
    """Negative control: every visible key range reaching one token further back (into the previous document)
    must break the same 1e-10 assertion."""
    real = sp_softmax_module.gathered_blocks
    monkeypatch.setattr(sp_softmax_module, "gathered_blocks", lambda lo, hi, T, n: real(max(lo - 1, 0), hi, T, n))
    case = packed_case(3)
    err = max_rel_err(run_sp_softmax(case, SPContext(emulate=3, layout="zigzag")), explicit(case))
    assert err["o"] > 1e-3 and err["k"] > 1e-3, err


def _saved_storages(fn, exclude):
    # unique storages saved for backward while fn runs (the inputs' own storages excluded), and the largest numel
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t),
                                                  lambda t: t):
        out = fn()
    skip = {x.untyped_storage().data_ptr() for x in exclude}
    kept = [t for p, t in saved.items() if p not in skip]
    return out, sum(t.untyped_storage().nbytes() for t in kept), max(t.numel() for t in saved.values())


def test_packed_keeps_no_T_local_by_T_tensor_and_saves_gathered_kv_once():
    """Packed documents, GQA 4:1, zigzag, W=4: no op creates a tensor of T_local·T elements in forward or backward
    (control: the old masked path's [T_local, T] mask); saved for backward beyond the inputs: exactly the gathered
    K|V once (unrepeated kv heads, no reordered copy) plus each rank's output and log-sum-exp."""
    W, T_local, H, Hkv, D = 4, 128, 4, 1, 8
    T, sp = W * T_local, SPContext(emulate=W, layout="zigzag")
    case = packed_case(W, T_local=T_local, H=H, Hkv=Hkv, D=D)
    q, k, v = (sp.shard(case[n]).requires_grad_() for n in ("q", "k", "v"))
    with LargestTensor() as rec:
        o, saved, largest_saved = _saved_storages(
            lambda: sp_softmax_attention(q, k, v, sp=sp, cu_seqlens=case["cu"]), (q, k, v))
        o.square().sum().backward()
    assert rec.numel < T_local * T and largest_saved < T_local * T
    assert saved == 8 * (2 * T * Hkv * D + T * H * D + T * H)           # fp64: K|V once, then o and lse per rank
    with LargestTensor() as control:
        mask = document_mask(case["cu"], T, True, q.device, q_positions=sp.local_positions(T_local)[0],
                             k_positions=torch.arange(T))
        sdpa(q[:1], case["k"], case["v"], mask=mask)
    assert control.numel >= T_local * T


def test_emulated_reduce_scatter_sums_slots_and_counts_bytes():
    W = 3
    x = torch.arange(W * W * 2, dtype=torch.float32).view(W, W, 2)     # [src rank, slot, ...]
    reset_comm_stats()
    assert torch.equal(EmuComm(W).reduce_scatter(x, "t"), x.sum(0))
    stats = comm_stats()["by_tag_op"]["t/reduce_scatter"]
    assert stats == {"calls": W, "bytes_sent": W * (W - 1) * 8, "bytes_recv": W * (W - 1) * 8}


def gloo_packed(rank, world_size):
    """Real ranks: the packed case on both layouts, with gloo's all_reduce backward and with the reduce_scatter
    backward NCCL uses (gloo implements reduce_scatter too); returns worst errors and the softmax_kv bytes."""
    errors, received = {}, {}
    for layout, native in itertools.product(LAYOUTS, (False, True)):
        sp = SPContext(layout=layout)
        sp.comm.native_reduce_scatter = native
        case = packed_case(world_size, Hkv=1)
        reset_comm_stats()
        errors[(layout, native)] = max(max_rel_err(run_sp_softmax(case, sp), explicit(case)).values())
        received[(layout, native)] = {k: s["bytes_recv"] for k, s in comm_stats()["by_tag_op"].items()
                                      if k.startswith("softmax_kv")}
    return errors, received


def test_gloo_packed_documents_and_reduce_scatter():
    W, T_local, Hkv, D = 2, 24, 1, 8
    slot = T_local * 2 * Hkv * D * 8                                    # one rank's fp64 K|V
    for errors, received in spawn(gloo_packed, W, timeout_s=120):
        assert all(e < 1e-10 for e in errors.values()), errors
        for layout in LAYOUTS:
            assert received[(layout, False)] == {"softmax_kv/all_gather": (W - 1) * slot,
                                                 "softmax_kv:bwd/all_reduce": 2 * (W - 1) * W * slot // W}
            assert received[(layout, True)] == {"softmax_kv/all_gather": (W - 1) * slot,
                                                "softmax_kv:bwd/reduce_scatter": (W - 1) * slot}


def test_packed_input_errors_name_the_argument():
    sp = SPContext(emulate=2)
    q = torch.randn(2, 8, 2, 4)
    with pytest.raises(ValueError, match="cu_seqlens must rise strictly from 0 to the global length 16"):
        sp_softmax_attention(q, q, q, sp=sp, cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens requires B == 1"):
        sp_softmax_attention(torch.randn(4, 8, 2, 4), torch.randn(4, 8, 2, 4), torch.randn(4, 8, 2, 4), sp=sp,
                             cu_seqlens=torch.tensor([0, 16], dtype=torch.int32))
