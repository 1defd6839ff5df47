"""What the Triton op costs besides its math, counted without a GPU: kernel launches per call and bytes saved for
backward.

- Launches: every kernel launch goes through `InterpretedFunction.run` under the interpreter (`JITFunction.run` on
  CUDA); counting them for T = 64 and T = 192 (1 and 3 chunks) and for packed sequences shows the count does not
  grow with T (a loop over chunks on the host would add launches per chunk).
- Saved bytes: `saved_tensors_hooks` sees every tensor the op keeps for backward. The op keeps q, k, v, g and the
  initial state (packed layouts come from the per-batch cache of `chunk_layout`), and recomputes h in backward, so
  saved / (q, k, v, g bytes) is 1 whatever T (measured 1.000 at T = 64 and 128 for every decay form). The split
  pieces used by SP keep h as well, K·V·2 / 64 bytes per token and head in bf16: +2/3 without decay, +1/2 with
  per-key decay at d=128, which the same measurement must see (the control that it can fail). The per-key case
  runs the 16-row kernels at d=128 under the interpreter (~15 s): marked slow.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from lsp.ops import linear_attention  # noqa: E402
from lsp.ops.linear.triton_chunk import kern, triton_chunk_output, triton_chunk_states  # noqa: E402
from lsp.plan.measure import saved_bytes  # noqa: E402

from .linear_cases import make_inputs  # noqa: E402
from .triton_interp import interpreter_bf16_dot  # noqa: E402,F401

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = type(kern._fwd_state_kernel).__name__ == "InterpretedFunction"
pytestmark = pytest.mark.skipif(DEVICE.type == "cpu" and not INTERPRETED,
                                reason="no CUDA, and the Triton kernels were imported without TRITON_INTERPRET=1")


@pytest.fixture
def launches(monkeypatch):
    """A list that receives the name of every kernel launched while the test runs."""
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    names = []
    cls = interpreter.InterpretedFunction if INTERPRETED else JITFunction
    original = cls.run

    def run(self, *args, **kwargs):
        names.append(self.fn.__name__ if INTERPRETED else self.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    return names


def _call(form, T, backward, cu=None):
    q, k, v, g, s0 = make_inputs(form, B=1, T=T, H=1, K=16, V=16, dtype=torch.float32, n_seq=None if cu is None
                                 else len(cu) - 1, requires_grad=backward)
    args = [None if x is None else x.to(DEVICE) for x in (q, k, v, g)]
    o, s = linear_attention(*args, initial_state=s0.to(DEVICE), output_final_state=True, backend="triton",
                            cu_seqlens=None if cu is None else cu.to(DEVICE))
    if backward:
        (o.sum() + s.sum()).backward()


@pytest.mark.parametrize("form,fwd,total", [("none", 2, 8), ("scalar", 2, 9), ("key", 3, 12)])
def test_launches_do_not_grow_with_T(launches, form, fwd, total):
    counts = {}
    for T in (64, 192):
        for backward in (False, True):
            launches.clear()
            _call(form, T, backward)
            counts[T, backward] = len(launches)
    assert counts[64, False] == counts[192, False] == fwd, counts
    assert counts[64, True] == counts[192, True] == total, counts
    # packed sequences (5 of them, one empty) launch the same kernels
    launches.clear()
    _call(form, 200, True, cu=torch.tensor([0, 10, 10, 80, 150, 200], dtype=torch.int32))
    assert len(launches) == total, launches
    # the counter sees launches: two calls launch twice as many kernels
    launches.clear()
    _call(form, 64, False)
    _call(form, 64, False)
    assert len(launches) == 2 * fwd


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_packed_layout_read_once_per_batch(monkeypatch, backend):
    # every linear layer of a model, forward and backward, gets the batch's one cu_seqlens tensor: its host read
    # (a device sync on a GPU) and the copy of the chunk tables happen once for it, not once per layer and pass
    import lsp.ops.boundaries as boundaries_mod
    import lsp.ops.linear.layout as layout_mod
    reads = []
    inner = boundaries_mod.remember   # what lsp.ops.boundaries calls after reading a tensor nobody recorded
    monkeypatch.setattr(boundaries_mod, "remember", lambda *a: reads.append(1) or inner(*a))
    cu = torch.tensor([0, 10, 10, 80, 150, 200], dtype=torch.int32, device=DEVICE)
    q, k, v, g, s0 = make_inputs("scalar", B=1, T=200, H=1, K=16, V=16, dtype=torch.float32, n_seq=5)
    args = [x.to(DEVICE).requires_grad_() for x in (q, k, v, g)]
    for _layer in range(3):
        o, s = linear_attention(*args, initial_state=s0.to(DEVICE), output_final_state=True, backend=backend,
                                cu_seqlens=cu)
        (o.sum() + s.sum()).backward()
    assert len(reads) == 1
    if backend == "triton":   # the device tables are the same tensors for every call
        lay = layout_mod.chunk_layout(1, 200, cu, 64, DEVICE)
        assert lay.chunk_tables(DEVICE)[0] is lay.chunk_tables(DEVICE)[0]
    # control: another batch's tensor, or this one written in place, is read again (a stale layout would be wrong)
    linear_attention(*args, backend=backend, cu_seqlens=cu.clone())
    cu[2] = 20
    o2, _ = linear_attention(*args, backend=backend, cu_seqlens=cu)
    assert len(reads) == 3
    ref, _ = linear_attention(*args, backend="naive", cu_seqlens=cu)
    torch.testing.assert_close(o2, ref, atol=1e-4, rtol=1e-4)





def _ratio(form, T, split=False, H=4, d=128):
    q, k, v, g, _ = make_inputs(form, B=1, T=T, H=H, K=d, V=d, dtype=torch.bfloat16, init=False)
    inputs = [x.to(DEVICE) for x in (q, k, v, g) if x is not None]
    g4 = None if g is None else inputs[3]

    def op():
        if split:
            h, _ = triton_chunk_states(inputs[1], inputs[2], g4)
            triton_chunk_output(inputs[0], inputs[1], inputs[2], g4, h, d**-0.5)
        else:
            linear_attention(*inputs, backend="triton")

    return saved_bytes(op) / sum(x.numel() * x.element_size() for x in inputs)


@pytest.mark.parametrize("form", ["none", pytest.param("key", marks=pytest.mark.slow)])
def test_saved_bytes_of_the_op(form):
    """Saved for backward <= 1.5x the bytes of q, k, v, g (H=4, d=128, bf16; the ratio does not depend on T)."""
    r1, r2 = _ratio(form, 64), _ratio(form, 128)
    assert r1 <= 1.5 and abs(r1 - r2) < 1e-3, (r1, r2)
    # control: the split pieces keep h ([R, H, NC, K, V] bf16, K·V·2 / 64 = 512 B per token and head at d = 128)
    # too, +2/3 of q, k, v without decay, +1/2 of q, k, v, g with per-key decay; the count must see it
    split = _ratio(form, 64, split=True)
    assert abs(split - r1 - (0.5 if form == "key" else 2 / 3)) < 1e-3, (split, r1)
