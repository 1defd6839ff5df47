import pytest
import torch

from lsp.models import HybridConfig


@pytest.fixture
def tiny_cfg():
    """Factory for small fp64-friendly configs: hidden 64, 4 heads (2 kv), vocab 128."""
    def make(**overrides):
        base = dict(vocab_size=128, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                    layer_pattern="LLLS", linear_attn="gla", ce_chunk_size=48)
        base.update(overrides)
        return HybridConfig(**base)
    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
