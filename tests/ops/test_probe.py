"""The first-use probe behind backend="auto" (lsp/ops/probe.py): good kernels are chosen, a broken kernel (wrong
result or a compile failure, monkeypatched here) falls back to the chunked torch path with one warning line naming
the op and the error, the verdict is kept per case, and forcing a backend skips the probe.

Without CUDA the kernels run under the Triton interpreter (tiny shapes: one row, 2 heads of 16, 80 tokens)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from lsp.ops import delta_rule, linear_attention, probe  # noqa: E402
from lsp.ops.delta import chunk as delta_chunk  # noqa: E402
from lsp.ops.linear import triton_chunk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    # every test starts before any first use, and `auto` may pick kernels on this device (CPU: the interpreter)
    monkeypatch.setattr(probe, "_VERDICTS", {})
    monkeypatch.setattr(probe, "kernels_by_default", lambda device: True)


def case(op="linear_attention", form="scalar", dtype=torch.float32):
    return probe.KernelCase(op, DEVICE, dtype, 16, 16, form)


def _probe_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if "first-use check" in str(w.message)]


# the per-key decay and the ungated delta rule take ~20 s / ~10 s under the interpreter: slow
@pytest.mark.parametrize("op,form", [pytest.param("linear_attention", "key", marks=pytest.mark.slow),
                                     ("linear_attention", "scalar"), ("delta_rule", "scalar"),
                                     pytest.param("delta_rule", "none", marks=pytest.mark.slow),
                                     pytest.param("dplr_delta_rule", "key", marks=pytest.mark.slow)])
def test_good_kernels_are_chosen_without_a_warning(op, form):
    verdict, warned = _probe_warnings(lambda: probe.probed_backend(case(op, form)))
    assert verdict == "triton" and warned == []


def _scaled_linear(monkeypatch, factor):
    real = triton_chunk.triton_linear_attention

    def wrong(*args, **kwargs):
        o, final = real(*args, **kwargs)
        return o * factor, final
    monkeypatch.setattr(triton_chunk, "triton_linear_attention", wrong)


def test_first_use_under_inference_mode_still_probes():
    """Generation runs under inference_mode: the probe must still differentiate (else it would reject good
    kernels for the whole process)."""
    with torch.inference_mode():
        verdict, warned = _probe_warnings(lambda: probe.probed_backend(case()))
    assert verdict == "triton" and warned == []


def test_wrong_linear_kernel_falls_back_with_one_warning(monkeypatch):
    """Outputs 10% off: far outside the fp32 tolerance, so the probe rejects the kernels."""
    _scaled_linear(monkeypatch, 1.1)
    verdict, warned = _probe_warnings(lambda: probe.probed_backend(case()))
    assert verdict == "torch" and len(warned) == 1
    assert "linear_attention Triton kernels" in warned[0] and "differs from the chunked torch path by" in warned[0]
    assert "\n" not in warned[0]


def test_kernel_within_tolerance_is_kept(monkeypatch):
    """Control of the tolerance: a 1e-4 relative perturbation (TF32-sized) is not a mismatch."""
    _scaled_linear(monkeypatch, 1 + 1e-4)
    assert probe.probed_backend(case()) == "triton"


@pytest.mark.slow   # ~12 s under the interpreter; the fallback itself is shared with the linear op (tests above)
def test_delta_kernel_ignoring_the_decay_falls_back(monkeypatch):
    import dataclasses

    scan = delta_chunk._triton_scan
    monkeypatch.setattr(delta_chunk, "_triton_scan",
                        lambda ch, U, init: scan(dataclasses.replace(ch, decay=None), U, init))
    verdict, warned = _probe_warnings(lambda: probe.probed_backend(case("delta_rule", "scalar")))
    assert verdict == "torch" and len(warned) == 1 and "delta_rule Triton kernels" in warned[0]


@pytest.mark.slow   # ~25 s under the interpreter here (the DPLR kernels, forward and backward, twice)
def test_dplr_kernel_with_a_wrong_sign_falls_back(monkeypatch):
    from lsp.ops.dplr import triton_chunk as dplr_chunk

    real = dplr_chunk.triton_forward
    monkeypatch.setattr(dplr_chunk, "triton_forward", lambda q, k, v, a, b, g, *rest: real(q, k, v, a, -b, g, *rest))
    verdict, warned = _probe_warnings(lambda: probe.probed_backend(case("dplr_delta_rule", "key")))
    assert verdict == "torch" and len(warned) == 1 and "dplr_delta_rule Triton kernels" in warned[0]


def test_the_delta_probe_inputs_have_the_gate_form_of_the_case():
    """Small version of the next test: the delta probe's gate per key channel is [1, T, H, K] (it was a gate per
    head [1, T, H], so the probe of a KDA call ran the per-head kernels)."""
    _, _, make = probe._INPUTS["delta_rule"]
    rnd = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    shapes = {form: tuple(make(rnd, 80, 2, 16, 8, form)["g"].shape) for form in ("scalar", "key")}
    assert shapes == {"scalar": (1, 80, 2), "key": (1, 80, 2, 16)} and "g" not in make(rnd, 80, 2, 16, 8, "none")


@pytest.mark.slow   # ~25 s of CPU under the interpreter
def test_the_delta_probe_runs_the_gate_form_of_its_case(monkeypatch):
    """The probe of a gate per key channel (KDA) runs the kernels on a gate per key (before: a gate per head, so a
    broken per-key kernel passed): good kernels are chosen; the per-key key kernel without the decay's gradient
    (argument 9 zeroed) is rejected."""
    from lsp.ops.delta import triton_chunk as delta_triton
    from lsp.ops.delta import triton_key

    from .test_delta_triton import _DropArgument

    verdict, warned = _probe_warnings(lambda: probe.probed_backend(case("delta_rule", "key")))
    assert verdict == "triton" and warned == []
    monkeypatch.setattr(probe, "_VERDICTS", {})
    monkeypatch.setattr(delta_triton, "_bwd_k_key_kernel", _DropArgument(triton_key._bwd_k_key_kernel, 9))
    verdict, warned = _probe_warnings(lambda: probe.probed_backend(case("delta_rule", "key")))
    assert verdict == "torch" and len(warned) == 1 and "delta_rule Triton kernels" in warned[0]


def test_compile_failure_falls_back_naming_the_error(monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("CompilationError: at 12:8: out of resource: shared memory\n  more detail")
    monkeypatch.setattr(triton_chunk, "triton_linear_attention", fails)
    verdict, warned = _probe_warnings(lambda: probe.probed_backend(case()))
    assert verdict == "torch" and len(warned) == 1
    assert "RuntimeError: CompilationError: at 12:8: out of resource: shared memory" in warned[0]
    assert "more detail" not in warned[0]


def _linear_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    x = [torch.randn(1, 80, 2, 16, generator=gen, dtype=dtype) for _ in range(3)]
    g = torch.nn.functional.logsigmoid(torch.randn(1, 80, 2, generator=gen, dtype=dtype) + 3)
    return [t.to(DEVICE) for t in (*x, g)]


def test_auto_runs_the_probed_choice_and_probes_once(monkeypatch):
    """auto = the kernels when they pass; a broken kernel makes auto the torch path (bitwise), warned once."""
    q, k, v, g = _linear_inputs()
    o_auto, _ = linear_attention(q, k, v, g)
    o_triton, _ = linear_attention(q, k, v, g, backend="triton")
    assert torch.equal(o_auto, o_triton) and set(probe._VERDICTS.values()) == {"triton"}

    monkeypatch.setattr(probe, "_VERDICTS", {})
    _scaled_linear(monkeypatch, 2.0)
    (o_auto, _), warned = _probe_warnings(lambda: linear_attention(q, k, v, g))
    assert len(warned) == 1 and torch.equal(o_auto, linear_attention(q, k, v, g, backend="torch")[0])
    _, warned_again = _probe_warnings(lambda: linear_attention(q, k, v, g))
    assert warned_again == []                                     # the verdict is kept: no second probe


@pytest.mark.slow   # ~15 s under the interpreter
def test_auto_delta_rule_goes_through_the_probe():
    gen = torch.Generator().manual_seed(4)
    q, v = (torch.randn(1, 80, 2, 16, generator=gen).to(DEVICE) for _ in range(2))
    k = torch.nn.functional.normalize(torch.randn(1, 80, 2, 16, generator=gen), dim=-1).to(DEVICE)
    beta = torch.rand(1, 80, 2, generator=gen).to(DEVICE)
    delta_rule(q, k, v, beta)
    assert probe._VERDICTS == {probe.KernelCase("delta_rule", DEVICE, torch.float32, 16, 16, "none"): "triton"}


def test_forcing_a_backend_skips_the_probe(monkeypatch):
    monkeypatch.setattr(probe, "probed_backend", lambda c: pytest.fail("probed although a backend was forced"))
    q, k, v, g = _linear_inputs()
    linear_attention(q, k, v, g, backend="torch")
    linear_attention(q, k, v, g, backend="triton")


def test_without_kernels_on_the_device_auto_is_torch(monkeypatch):
    monkeypatch.setattr(probe, "kernels_by_default", lambda device: False)
    monkeypatch.setattr(probe, "probed_backend", lambda c: pytest.fail("probed on a device without kernels"))
    q, k, v, g = _linear_inputs()
    linear_attention(q, k, v, g)
