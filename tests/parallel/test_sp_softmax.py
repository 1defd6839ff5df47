"""sp_softmax_attention (LASP-2H) in emulation equals single-device softmax attention; zigzag balances FLOPs."""
import pytest
import torch

from lsp.parallel import SPContext, attention_flops_balance, comm_stats, reset_comm_stats, sp_softmax_attention

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
    assert comm_stats()["by_tag_op"]["softmax_kv/all_gather"]["bytes_recv"] / W == (W - 1) * 2 * B * T_local * Hkv * D * 4


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
        sp_softmax_attention(q, q, q, sp=sp, method="ring")


def _largest_saved(fn):
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        fn()
    return max(sizes)


def test_causal_sp_softmax_forms_no_mask():
    """Causal without documents, each segment attends its causal key prefix without a [T_local, T] mask (which the
    masked path saves for backward: the control). Largest saved tensor: the gathered K|V, 2·T·Hkv·D."""
    W, T_local, Hkv, D = 4, 64, 2, 8
    T = W * T_local
    sp = SPContext(emulate=W, layout="zigzag")
    q = torch.randn(W, T_local, 4, D, requires_grad=True)
    k, v = (torch.randn(W, T_local, Hkv, D, requires_grad=True) for _ in range(2))
    no_mask = _largest_saved(lambda: sp_softmax_attention(q, k, v, sp=sp))
    assert no_mask <= 2 * T * Hkv * D < T_local * T
    one_doc = torch.tensor([0, T], dtype=torch.int32)
    assert _largest_saved(lambda: sp_softmax_attention(q, k, v, sp=sp, cu_seqlens=one_doc)) >= T_local * T
