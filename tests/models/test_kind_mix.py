"""Kinds per position: `model.layer_pattern` names a registered kind per layer (`mamba2,mamba2,mamba2,S`), with
`L` the shorthand for `model.linear_attn`; validated torch-free; HybridLM builds each position's kind, SP equals one
device on a mix, and the FLOP counter and the planner sum their formulas per position."""
import os
import subprocess
import sys

import pytest
import torch

from lsp.hybrid_config import HybridConfig, HybridConfigError
from lsp.models import HybridLM, flops_per_token, layer_kind

from .kind_checks import check_planner_prices
from .sp_workers import CFG
from .test_model_sp import check_emulated

SMALL = dict(vocab_size=8, hidden_size=16, num_heads=2)


@pytest.mark.parametrize("pattern, layers, kinds", [
    ("LLS", 4, ("gla", "gla", None, "gla")),                                   # letters, L = linear_attn
    ("mamba2,mamba2,mamba2,S", 4, ("mamba2", "mamba2", "mamba2", None)),
    ("hgrn2, L ,softmax", 5, ("hgrn2", "gla", None, "hgrn2", "gla")),           # names, repeated to num_layers
    ("mamba2", 2, ("mamba2", "mamba2")),                                       # one name, no comma
])
def test_pattern_names_a_kind_per_position(pattern, layers, kinds):
    cfg = HybridConfig(**SMALL, num_layers=layers, layer_pattern=pattern)
    assert cfg.position_kinds == kinds
    assert cfg.layer_types == "".join("S" if k is None else "L" for k in kinds)


def test_model_builds_each_positions_kind():
    model = HybridLM(HybridConfig(**SMALL, num_layers=4, layer_pattern="mamba2,hgrn2,S,gla"))
    assert [type(b.attn).__name__ for b in model.layers] == ["Mamba2", "HGRN2", "SoftmaxAttention", "GLA"]


@pytest.mark.parametrize("pattern, message", [
    ("mamba2,rwkv6,S",
     r"^layer_pattern: 'rwkv6' \(entry 1 of 'mamba2,rwkv6,S'\) is not one of L, S, softmax, deltanet, "),
    ("LXS", r"^layer_pattern: 'X' \(entry 1 of 'LXS'\) is not one of L, S, softmax, "),
    ("mamba2,,S", r"^layer_pattern: '' \(entry 1 of 'mamba2,,S'\) is not one of "),
    (",", r"^layer_pattern: ',' must be a non-empty string"),
])
def test_unknown_kind_in_the_pattern_is_one_line_with_the_choices(pattern, message):
    with pytest.raises(HybridConfigError, match=message) as err:
        HybridConfig(**SMALL, num_layers=3, layer_pattern=pattern)
    assert "\n" not in str(err.value) and {"mamba2", "hgrn2", "softmax"} <= set(err.value.choices)


def test_pattern_kinds_are_checked_without_torch():
    code = ("import sys; from lsp.hybrid_config import HybridConfig; "
            "c = HybridConfig(vocab_size=8, hidden_size=16, num_layers=4, num_heads=2, "
            "layer_pattern='mamba2,hgrn2,S'); "
            "assert c.position_kinds == ('mamba2', 'hgrn2', None, 'mamba2'), c.position_kinds; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.mark.parametrize("W, layout, method", [(2, "zigzag", "allgather"), (4, "contiguous", "allscan")])
def test_sp_on_a_mix_equals_single_device(W, layout, method):
    check_emulated(W, layout, method=method, layer_pattern="mamba2,S,hgrn2", ssm_state_size=8)


def test_flops_sum_per_position():
    """A mix's FLOPs per token lie between the uniform models' by exactly its share of each kind: with one layer
    of hgrn2 and one of gla, the mean of all-hgrn2 and all-gla (a count by linear_attn alone would give either)."""
    def flops(pattern):
        return flops_per_token(HybridConfig(**SMALL, num_layers=3, layer_pattern=pattern), 256)

    mix, gla, hgrn2 = flops("hgrn2,gla,S"), flops("gla,gla,S"), flops("hgrn2,hgrn2,S")
    assert gla != hgrn2
    assert mix == pytest.approx((gla + hgrn2) / 2, rel=1e-12)
    cfg = HybridConfig(**SMALL, num_layers=3, layer_pattern="mamba2,hgrn2,S")
    assert flops(cfg.layer_pattern) == pytest.approx(
        6 * num_parameters_matmul(cfg) + 6 * cfg.num_heads * cfg.head_dim * 256
        + sum(layer_kind(k).attention_flops_per_token(cfg, 256) for k in ("mamba2", "hgrn2")), rel=1e-12)


def num_parameters_matmul(cfg):
    # the matmul weights one token passes, by building the model: every Linear's weight (the LM head included)
    model = HybridLM(cfg)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_planner_prices_a_mix():
    """Parameters exact and exchange bytes (mamba2's states, scalar decays and conv halo; hgrn2's states and
    per-key decays) equal what one emulated step sends."""
    H, Dh, N = CFG["num_heads"], CFG["hidden_size"] // CFG["num_heads"], 8
    check_planner_prices((4 - 1) * (H * Dh + 2 * N) * 4, layer_pattern="mamba2,hgrn2", ssm_state_size=N)


def test_plan_cluster_on_a_mix_has_fitting_candidates():
    from lsp.plan.planner import Cluster, plan_cluster
    from lsp.run_config import load_config

    run = load_config(None, ["model.layer_pattern=mamba2,mamba2,gated_deltanet,S", "model.num_layers=4"],
                      check_files=False)
    assert any(c.fits for c in plan_cluster(run, Cluster(gpus=8), vocab_size=257))
