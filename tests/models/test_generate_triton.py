"""Decoding with the Triton prefill (`linear_backend="triton"`): the prompt and a multi-token continuation go through
the Triton kernels with `initial_state` / `output_final_state` (for Gated DeltaNet: its Triton chunk scan), then
single tokens through the recurrence.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported, as in
tests/ops/test_triton.py); shapes stay tiny. Reference: the full forward on the chunked torch path. fp32 kernels
against fp32 torch: ~1e-7 measured on logits of size ~0.1, tolerance 1e-5; the control (no state carried into the
continuation) misses by more than 1e-3.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from lsp.models import HybridConfig, HybridLM  # noqa: E402
from lsp.ops.linear.triton_chunk import kern  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and type(kern._fwd_state_kernel).__name__ != "InterpretedFunction",
    reason="no CUDA, and the Triton kernels were imported without TRITON_INTERPRET=1 before this module set it")


@torch.no_grad()
@pytest.mark.parametrize("kind", ["gla", "simple_gla", "gated_deltanet"])
def test_triton_prefill_then_recurrence_equals_full_forward(kind):
    torch.manual_seed(0)
    cfg = HybridConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, layer_pattern="LS",
                       linear_attn=kind, linear_backend="torch")
    model = HybridLM(cfg).to(DEVICE).eval()
    ids = torch.randint(0, 40, (1, 70), device=DEVICE)
    full = model(ids).logits
    cfg.linear_backend = "triton"

    def decode(carry_state=True):
        cache = model.new_cache()
        parts = [model(ids[:, :37], cache=cache).logits]
        if not carry_state:
            cache.layers[0].state = None
        parts.append(model(ids[:, 37:66], cache=cache).logits)
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(66, 70)]
        return torch.cat(parts, dim=1)

    assert (decode() - full).abs().max() < 1e-5
    assert (decode(carry_state=False) - full).abs().max() > 1e-3
