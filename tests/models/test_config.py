import pytest

from lsp.models import HybridConfig
from lsp.models.config import default_intermediate_size

BASE = dict(vocab_size=128, hidden_size=64, num_layers=4, num_heads=4)


def test_defaults_and_pattern_repeat():
    cfg = HybridConfig(**{**BASE, "num_layers": 7}, layer_pattern="LLS")
    assert cfg.layer_types == "LLSLLSL"
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 16
    assert cfg.intermediate_size == 192  # 8/3 * 64 = 170.7 -> next multiple of 64
    assert default_intermediate_size(4096) == 10944  # 10922.7 rounded up to a multiple of 64


def test_dict_roundtrip():
    cfg = HybridConfig(**BASE, linear_attn="lightning", tie_embeddings=True)
    assert HybridConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides, field", [
    (dict(layer_pattern="LXS"), "layer_pattern"),
    (dict(layer_pattern=""), "layer_pattern"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(hidden_size=66), "hidden_size"),
    (dict(linear_attn="mamba"), "linear_attn"),
    (dict(linear_backend="cuda"), "linear_backend"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(head_dim=15), "head_dim"),
    (dict(norm_eps=-1.0), "norm_eps"),
])
def test_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        HybridConfig(**{**BASE, **overrides})


def test_from_dict_unknown_and_missing_keys():
    with pytest.raises(ValueError, match="hiden_size"):
        HybridConfig.from_dict({**BASE, "hiden_size": 3})
    with pytest.raises(ValueError, match="num_heads"):
        HybridConfig.from_dict({k: v for k, v in BASE.items() if k != "num_heads"})
