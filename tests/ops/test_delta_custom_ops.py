"""The delta rule's Triton op and chunk scan as torch custom ops (lsp/ops/delta/custom_ops.py).

Fake tensors (what `lsp plan --measure` runs on) and meta tensors go through the ops' `register_fake`; the real
tensors run the kernels under the Triton interpreter (tiny shapes). Checked here, as tests/ops/test_custom_ops.py
does for the linear op:
- the fake op saves for backward exactly the bytes the real Triton op saves (saved-tensor hooks, distinct
  storages): the inputs for the whole op; for the SP path's chunked torch pieces around the Triton scan, whatever
  they keep, the same on both; the negative control is the same pieces with the torch scan, which keep more;
- every output and gradient of the fake / meta op has the real one's shape and dtype;
- FlopCounterMode counts the ops with their registered formulas, equal on fake and real tensors;
- `auto` measures the Triton path under `gpu_code_paths()`, for a gate per head and per key channel (KDA);
- torch.compile traces the op without a graph break.
Exactness of the math is tests/ops/test_delta_triton*.py (the kernels and launchers are unchanged).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # read when triton is imported (torch.utils.flop_counter and fake tensors import it): set it first
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lsp.ops.delta import chunk as chunk_mod  # noqa: E402
from lsp.ops.delta.api import resolve_delta_backend  # noqa: E402
from lsp.ops.delta.custom_ops import delta_chunk_flops, delta_scan_flops, register_flop_formulas  # noqa: E402
from lsp.ops.estimate import gpu_code_paths, measured_backend  # noqa: E402
from lsp.ops.probe import kernel_case  # noqa: E402

from .delta_cases import NAMES, make_delta_inputs  # noqa: E402
from .saved import as_fake, saved_bytes  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
SHAPE = dict(B=1, T=70, H=2, K=16, V=8)       # two chunks, the second partial


def _inputs(gated=True, fake_mode=None, device=None, **shape):
    # gated: False (no gate), True (one per head) or "key" (one per key channel, KDA)
    x = make_delta_inputs(gated=bool(gated), dtype=torch.float32, per_key=gated == "key", **{**SHAPE, **shape})
    xs = [x[n] for n in NAMES]
    if fake_mode is not None:
        return as_fake(xs, fake_mode)
    if device is not None:
        return [None if t is None else t.detach().to(device).requires_grad_(True) for t in xs]
    return xs


def _op(q, k, v, beta, g, s0):
    # what delta_rule(..., backend="triton") runs once validated (its autocast guard takes no meta device)
    return chunk_mod.chunk_delta_rule(q, k, v, beta, g, 0.25, s0, True, scan_backend="triton")


def _pieces(scan_backend):
    # what sp_delta_rule runs per held segment: the UT transform and the output in torch, the scan on scan_backend
    def run(q, k, v, beta, g, s0):
        return chunk_mod.chunk_forward(q, k, v, beta, g, 0.25, s0, True, scan_backend=scan_backend)
    return run


def _both(fn, gated):
    """(real, fake) saved bytes of fn (fake inputs made from real ones, outside the mode)."""
    real = saved_bytes(lambda: fn(*_inputs(gated)))
    mode = FakeTensorMode()
    fake_inputs = _inputs(gated, mode)
    with mode, gpu_code_paths():
        fake = saved_bytes(lambda: fn(*fake_inputs))
    return real, fake


@pytest.mark.parametrize("gated", [False, True, "key"])
def test_fake_op_saves_what_the_triton_op_saves(gated):
    assert measured_backend("delta_rule") == "triton"             # importing lsp.ops registered the ops
    kept = sum(x.numel() * x.element_size() for x in _inputs(gated) if x is not None)   # q, k, v, beta, g, init
    real, fake = _both(_op, gated)
    assert real == fake == kept
    pieces_real, pieces_fake = _both(_pieces("triton"), gated)
    assert pieces_real == pieces_fake
    # negative control: the torch scan keeps every chunk's state and W (autograd of the loop), the kernel's op only
    # its inputs and the entering states; the same count must see the difference
    torch_real, torch_fake = _both(_pieces("torch"), gated)
    assert torch_real == torch_fake > pieces_real


def _shapes(fn, inputs):
    o, final = fn(*inputs)
    grads = torch.autograd.grad(o.float().sum() + final.sum(), [x for x in inputs if x is not None])
    return [(tuple(t.shape), t.dtype) for t in (o, final, *grads)]


@pytest.mark.parametrize("gated", [True, "key"])
@pytest.mark.parametrize("fn", [_op, _pieces("triton")], ids=["op", "scan"])
def test_fake_and_meta_shapes_match_the_real_op(fn, gated):
    real = _shapes(fn, _inputs(gated))
    mode = FakeTensorMode()
    fake_inputs = _inputs(gated, fake_mode=mode)
    with mode:
        fake = _shapes(fn, fake_inputs)
    meta = _shapes(fn, _inputs(gated, device="meta"))
    assert real == fake == meta
    assert real != _shapes(fn, _inputs(gated=False))      # control: the gate's gradient is in the list


def test_flop_counter_counts_the_ops_with_their_formulas():
    register_flop_formulas()
    B, T, H, K, V = SHAPE.values()
    c = delta_chunk_flops(K, V)
    chunks = B * H * 2                                             # two padded chunks per head
    want = {_op: chunks * (2 * (c["ut"] + c["scan"]) + c["output"] + c["grads"])}
    counts = {}
    for fn in (_op, _pieces("triton")):
        for mode in (None, FakeTensorMode()):
            xs = _inputs(fake_mode=mode)
            with mode or torch.device("cpu"), FlopCounterMode(display=False) as counter:
                o, final = fn(*xs)
                (o.sum() + final.sum()).backward()
            counts.setdefault(fn, []).append(counter.get_total_flops())
    assert counts[_op][0] == counts[_op][1] == want[_op]
    # the pieces: torch's matmuls around the scan, plus the scan op's formula; nothing else differs between paths
    pieces = counts[next(f for f in counts if f is not _op)]
    assert pieces[0] == pieces[1]
    with FlopCounterMode(display=False) as counter:
        o, final = _pieces("torch")(*_inputs())
        (o.sum() + final.sum()).backward()
    fwd, bwd = delta_scan_flops(K, V)
    assert pieces[0] - counter.get_total_flops() == chunks * (fwd + bwd) - _torch_scan_flops(K, V, chunks)
    assert c["output"] == 2 * 64 * 64 * 16 + 4 * 64 * 16 * 8 + 2 * 64 * 64 * 8      # V = 8: one V block


def test_flop_formula_of_a_gate_per_key():
    """A gate per key channel is counted with its 16-row score kernels (`delta_chunk_flops(key=True)`), on real and
    fake tensors; control: the per-head count differs (the formula sees g's shape)."""
    register_flop_formulas()
    K, V = SHAPE["K"], SHAPE["V"]
    per_key, per_head = delta_chunk_flops(K, V, key=True), delta_chunk_flops(K, V)
    total = lambda c: 2 * (c["ut"] + c["scan"]) + c["output"] + c["grads"]  # noqa: E731 (one chunk, one head)
    counts = []
    for mode in (None, FakeTensorMode()):
        xs = _inputs("key", fake_mode=mode, T=20, H=1)
        with mode or torch.device("cpu"), FlopCounterMode(display=False) as counter:
            o, final = _op(*xs)
            (o.sum() + final.sum()).backward()
        counts.append(counter.get_total_flops())
    assert counts == [total(per_key)] * 2 and total(per_key) != total(per_head)


def _torch_scan_flops(K, V, chunks) -> int:
    # FlopCounterMode's count of the torch scan forward + backward (autograd of its loop) on the same chunks
    xs = make_delta_inputs(gated=True, dtype=torch.float32, **SHAPE)
    ch = chunk_mod.prepare_chunks(xs["k"], xs["v"], xs["beta"], xs["g"])
    U, init = ch.U.detach().requires_grad_(), xs["initial_state"].detach().requires_grad_()
    ch = chunk_mod.DeltaChunks(ch.layout, ch.k, ch.G, ch.Kd.detach().requires_grad_(),
                               ch.Wk.detach().requires_grad_(), U, ch.decay.detach().requires_grad_())
    with FlopCounterMode(display=False) as counter:
        entering, final = chunk_mod.chunk_scan(ch, U, init)
        (entering.sum() + final.sum()).backward()
    return counter.get_total_flops()


def test_auto_measures_the_kernels_for_every_gate_form():
    q, k, v, beta, g, _ = _inputs()
    per_key = g[..., None].expand(*g.shape, k.shape[-1])
    with gpu_code_paths():
        for gate in (None, g, per_key):
            assert resolve_delta_backend("auto", q.device, kernel_case("delta_rule", k, v, gate)) == "triton"
    # outside the estimator, on CPU, auto stays on torch (no CUDA)
    for gate in (g, per_key):
        assert resolve_delta_backend("auto", q.device, kernel_case("delta_rule", k, v, gate)) == "torch"


def test_compile_sees_no_graph_break():
    import torch._dynamo

    q, k, v, beta, g, s0 = _inputs(T=20, H=1)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_op)(q, k, v, beta, g, s0)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    ops = [str(n.target) for gm in explained.graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert any("lsp.delta_rule" in t for t in ops), ops

    def broken(*xs):           # control: the same count sees a break
        o, final = _op(*xs)
        torch._dynamo.graph_break()
        return o * 2, final
    torch._dynamo.reset()
    assert torch._dynamo.explain(broken)(q, k, v, beta, g, s0).graph_break_count == 1
