"""One model schema: the run config's `model:` section is HybridConfig's fields (no copy, no `extra` back door).

Every HybridConfig key is a config key: a good value reaches the model (`hybrid_config`), a bad one is a one-line
ConfigError naming `model.<key>`. A config.yaml saved before `model.extra` was removed still loads."""
import dataclasses
import os

import pytest
import torch
import yaml

from lsp.models import HybridConfig
from lsp.run_config import RUN_MODEL_DEFAULTS, SET_ELSEWHERE, ConfigError, ModelConfig, hybrid_config, load_config
from lsp.train import load_run
from lsp.train.trainer import Trainer

from .conftest import SMALL, TINY


def schema_drift(section) -> list:
    """Differences between a `model:` section dataclass and HybridConfig: missing or extra keys, other defaults
    (the run's own defaults for the shape keys excepted)."""
    ours = {f.name: f.default for f in dataclasses.fields(section)}
    theirs = {f.name: RUN_MODEL_DEFAULTS.get(f.name, f.default) for f in dataclasses.fields(HybridConfig)
              if f.name not in SET_ELSEWHERE}
    return sorted(f"{k}: {ours.get(k, 'absent')} here, {theirs.get(k, 'absent')} in HybridConfig"
                  for k in ours.keys() | theirs.keys() if ours.get(k, "absent") != theirs.get(k, "absent"))


@dataclasses.dataclass
class OldModelConfig:   # the hand-written copy this schema replaced (negative control)
    vocab_size: int = 0
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 2
    layer_pattern: str = "LS"
    linear_attn: str = "gla"
    extra: dict = dataclasses.field(default_factory=dict)


def test_model_section_is_hybrid_config():
    assert schema_drift(ModelConfig) == []
    assert set(SET_ELSEWHERE) <= {f.name for f in dataclasses.fields(HybridConfig)}
    # control: the old copy drifts (an `extra` key, 11 HybridConfig keys missing, the 10 MoE keys, num_v_heads and
    # the 2 mamba2 keys ssm_state_size, ssm_groups since)
    drift = schema_drift(OldModelConfig)
    assert [d for d in drift if d.startswith("extra: ") and d.endswith(" here, absent in HybridConfig")], drift
    assert len(drift) == 25


# per key: (a good value that must reach HybridConfig, a bad value that must be rejected naming the key)
CASES = {
    "vocab_size": (300, -1), "hidden_size": (32, 0), "num_layers": (3, 0), "num_heads": (4, 0),
    "num_kv_heads": (1, 0), "num_v_heads": (4, 3), "layer_pattern": ("SL", "LX"), "linear_attn": ("lightning", "mamba"),
    "head_dim": (16, 15), "intermediate_size": (96, 0), "rope_theta": (500000.0, 0.0), "norm_eps": (1e-5, -1.0),
    "tie_embeddings": (True, "maybe"), "gate_low_rank_dim": (8, 0), "gate_logit_normalizer": (8.0, 0.0),
    "delta_conv_size": (3, 0), "linear_backend": ("naive", "cuda"), "ce_chunk_size": (128, 0),
    "initializer_range": (0.01, -0.5),
    "moe_experts": (4, -1), "moe_top_k": (1, 0), "moe_shared_experts": (1, -1), "moe_intermediate_size": (32, 0),
    "moe_first_dense": (1, -1), "moe_router": ("sigmoid", "relu"), "moe_aux_loss_coef": (0.01, -1.0),
    "moe_bias_update_rate": (0.001, -0.1), "moe_z_loss_coef": (0.001, -1.0), "moe_capacity_factor": (1.25, 0.0),
    "ssm_state_size": (32, 0), "ssm_groups": (2, 3),
}


def test_every_key_has_a_case():
    assert set(CASES) == {f.name for f in dataclasses.fields(ModelConfig)}


@pytest.mark.parametrize("key", sorted(CASES))
def test_every_model_key_reaches_the_model_or_is_named(key):
    good, bad = CASES[key]
    model = hybrid_config(load_config(TINY, [f"model.{key}={good}"]), vocab_size=81)
    assert getattr(model, key) == good
    assert getattr(hybrid_config(load_config(TINY), vocab_size=81), key) != good      # control: not the default
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [f"model.{key}={bad}"])
    assert err.value.key == f"model.{key}" and str(err.value).startswith(f"model.{key}: ")
    assert "\n" not in str(err.value)


def test_train_owned_field_is_not_a_model_key():
    assert hybrid_config(load_config(TINY, ["train.activation_checkpointing=true"]), 81).activation_checkpointing
    with pytest.raises(ConfigError, match=r"^model.activation_checkpointing: unknown key; did you mean "
                                          r"train.activation_checkpointing\?"):
        load_config(TINY, ["model.activation_checkpointing=true"])


def test_no_back_door_around_the_validated_keys(tmp_path):
    """`model.extra.sp_method` used to override the validated parallel.sp_method in silence; a model key that is no
    HybridConfig field is now rejected by name, on the command line and in a file. Control: the real key works."""
    saved = tmp_path / "old.yaml"
    saved.write_text("model:\n  extra: {sp_method: ring}\n")
    for args in ((TINY, ["model.sp_method=ring"]), (str(saved), [])):
        with pytest.raises(ConfigError, match=r"^model.sp_method: unknown key; did you mean parallel.sp_method\?"):
            load_config(*args)
    assert load_config(TINY, ["parallel.sp_method=ring"]).parallel.sp_method == "ring"


def old_format(config_yaml: str, moved: dict) -> str:
    """A config.yaml as the old schema wrote it: the seven hand-copied keys, the rest under `model.extra`."""
    cfg = yaml.safe_load(config_yaml)
    old = {f.name: cfg["model"][f.name] for f in dataclasses.fields(OldModelConfig) if f.name != "extra"}
    cfg["model"] = {**old, "extra": moved}
    return yaml.safe_dump(cfg, sort_keys=False)


def test_saved_model_extra_is_read_as_model_keys(tmp_path):
    """A run saved with rope_theta / norm_eps under `model.extra` (the old schema) loads with them as model keys:
    the same HybridConfig and weights as the run itself. Control: dropping them gives another config."""
    overrides = [*SMALL, f"out_dir={tmp_path}", "name=old", "parallel.sp=1", "train.steps=2",
                 "model.rope_theta=500000.0", "model.norm_eps=1e-5"]
    Trainer(load_config(TINY, overrides)).fit()
    run_dir = os.path.join(tmp_path, "old")
    saved = os.path.join(run_dir, "checkpoints", "step_00000002", "config.yaml")
    os.remove(os.path.join(os.path.dirname(saved), "manifest.json"))   # a checkpoint of that schema had none
    with open(saved) as f:
        text = f.read()
    new_model, _ = load_run(run_dir)
    for moved, same in (({"rope_theta": 500000.0, "norm_eps": 1e-5}, True), ({}, False)):
        with open(saved, "w") as f:
            f.write(old_format(text, moved))
        old_model, _ = load_run(run_dir)
        assert (old_model.cfg == new_model.cfg) is same, old_model.cfg
    params = dict(new_model.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in old_model.named_parameters())
    with open(saved, "w") as f:   # a key that is no HybridConfig field is still named
        f.write(old_format(text, {"rope_thetta": 1.0}))
    with pytest.raises(ConfigError, match=r"model.rope_thetta: unknown key; did you mean model.rope_theta\?"):
        load_config(saved)
