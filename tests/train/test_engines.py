"""Engines by name (lsp/engines.py, lsp/train/engine.py): one class per engine, looked up in one registry; an unknown
name raises everywhere (config, spec, runtime); the planner's memory model of each engine is its class's formula.

Reference for the formulas: the bytes-per-parameter table in lsp/engines.py's docstring, written out by hand below
at n = 8 ranks. The "comes from the class" test patches one class's formula and sees exactly that change in the
plan; patching every other engine's class is the control that must leave it unchanged."""
import json
import os

import pytest
import torch

import lsp.engines as engines
from lsp.engines import EngineSpec, engine_names, engine_spec
from lsp.models import HybridLM
from lsp.plan.measure import modelled
from lsp.plan.planner import Cluster, model_parameters, plan_cluster
from lsp.run_config import ConfigError, hybrid_config, load_config
from lsp.train.dist import Mesh
from lsp.train.engine import DDPEngine, Engine, TrainEngine, engine_class

from .conftest import REPO, SMALL, TINY
from .test_load_run import STEPS, train_tiny

ONE_NODE = os.path.join(REPO, "configs", "hybrid-1.3b-128k.yaml")
GB = 1e9
# bytes per parameter on one of 8 GPUs: fp32 weight 4 + gradient 4 + AdamW 8, sharded as each engine shards them
BY_HAND = {("ddp", 0): 16 + 4, ("fsdp", 2): 2 + 16 / 8, ("fsdp", 3): 16 / 8, ("deepspeed", 0): 16 + 4,
           ("deepspeed", 1): 8 + 8 / 8, ("deepspeed", 2): 4 + 12 / 8, ("deepspeed", 3): 16 / 8}


def one_process_mesh():
    return Mesh(rank=0, world=1, dp=1, sp=1, dp_rank=0, sp_rank=0, device=torch.device("cpu"))


def test_the_registry_holds_the_three_engines_and_the_config_choices_are_its_names():
    assert engine_names() == ("ddp", "fsdp", "deepspeed")
    with pytest.raises(ConfigError, match=r"parallel\.engine.*megatron") as err:
        load_config(TINY, [*SMALL, "parallel.engine=megatron"])
    assert all(name in str(err.value) for name in engine_names())


def test_an_unknown_engine_raises_in_the_spec_the_runtime_and_the_planner():
    with pytest.raises(ValueError, match="unknown engine 'megatron'; registered: ddp, fsdp, deepspeed"):
        engine_spec("megatron")
    with pytest.raises(ValueError, match="unknown engine 'megatron'"):
        engine_class("megatron")
    cfg = load_config(ONE_NODE, [], check_files=False)
    cfg.parallel.engine = "megatron"   # past validation: the planner no longer falls back to DeepSpeed's formulas
    with pytest.raises(ValueError, match="unknown engine 'megatron'"):
        plan_cluster(cfg, Cluster(gpus=8), vocab_size=257, sp_choices=[8])


def test_a_half_registered_engine_raises(monkeypatch):
    """A spec without a runtime class is refused by name, not run as another engine."""
    class Toy(EngineSpec):
        name, zero_stages = "toy", (0,)

    monkeypatch.setitem(engines.ENGINES, "toy", Toy)
    assert engine_spec("toy") is Toy
    with pytest.raises(ValueError, match="'toy' is registered in lsp.engines but has no runtime class"):
        engine_class("toy")
    cfg = load_config(TINY, [*SMALL, "parallel.sp=1"])
    cfg.parallel.engine = "toy"
    with pytest.raises(ValueError, match="no runtime class"):
        Engine(cfg, one_process_mesh(), HybridLM(hybrid_config(cfg, 64)))
    with pytest.raises(NotImplementedError, match="'toy' has no state_bytes_per_param"):
        Toy.state_bytes_per_param(0, 8)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed"])
def test_each_runtime_class_is_its_registered_spec(name):
    cls = engine_class(name)
    assert issubclass(cls, Engine) and issubclass(cls, engine_spec(name)) and cls.name == name


def test_engine_builds_the_class_named_in_the_config():
    cfg = load_config(TINY, [*SMALL, "parallel.sp=1"])
    engine = Engine(cfg, one_process_mesh(), HybridLM(hybrid_config(cfg, 64)))
    assert type(engine) is DDPEngine and isinstance(engine, TrainEngine)


def test_zero_stages_are_checked_by_the_engine_class():
    assert [engine_spec("fsdp").zero_problem(z) is None for z in range(4)] == [False, False, True, True]
    assert engine_spec("ddp").zero_problem(2) == "2 needs parallel.engine=fsdp or deepspeed (ddp has ZeRO 0)"
    assert engine_spec("deepspeed").zero_problem(5) == "5 is not one of 0, 1, 2, 3"


@pytest.mark.parametrize("name,zero", sorted(BY_HAND))
def test_planner_memory_model_comes_from_the_engine_class(monkeypatch, name, zero):
    cfg = load_config(ONE_NODE, [f"parallel.engine={name}", f"parallel.zero={zero}"], check_files=False)
    params = model_parameters(hybrid_config(cfg, 257))
    assert engine_spec(name).state_bytes_per_param(zero, 8) == BY_HAND[name, zero]
    # memory per candidate, keyed by what the candidate is (a memory change can reorder the ranked list)
    plan = lambda: {(c.method, c.softmax_method, c.micro_batch, c.checkpointing): c.memory_gb  # noqa: E731
                    for c in plan_cluster(cfg, Cluster(gpus=8), vocab_size=257, sp_choices=[8])}
    states = lambda: modelled(cfg, hybrid_config(cfg, 257), 8).memory["states"]  # noqa: E731
    before, before_states = plan(), states()
    assert before_states == BY_HAND[name, zero] * params
    # control: the other engines' classes are not asked
    for other in engine_names():
        if other != name:
            monkeypatch.setattr(engine_spec(other), "state_bytes_per_param", classmethod(lambda cls, z, n: 1e6))
    assert plan() == before and states() == before_states
    # this engine's class is: one more byte per parameter moves every candidate by params bytes
    monkeypatch.setattr(engine_spec(name), "state_bytes_per_param", classmethod(lambda cls, z, n: BY_HAND[name, z] + 1))
    assert plan() == pytest.approx({k: m + params / GB for k, m in before.items()}, rel=1e-12)
    assert states() == before_states + params


def logged(run_dir, key):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [row[key] for row in map(json.loads, f) if key in row]


@pytest.mark.slow
def test_deepspeed_zero3_trains_as_ddp(tmp_path):
    """2 gloo ranks, dp = 2: DeepSpeed ZeRO-3 (weights, gradients and AdamW state partitioned; the head's loss in
    its own module, see lsp/models/loss.py:LMHead) logs DDP's step losses and eval loss. Tolerance 1e-6 relative:
    the same fp32 math, reduced in another order (reduce-scatter vs all-reduce; measured ~5e-8). Control: the same
    comparison between consecutive steps fails, so the tolerance is far below what one step changes."""
    pytest.importorskip("deepspeed")
    ddp = train_tiny(tmp_path / "ddp", "parallel.sp=1", launch=2)
    zero3 = train_tiny(tmp_path / "z3", "parallel.sp=1", "parallel.engine=deepspeed", "parallel.zero=3", launch=2)
    losses, reference = logged(zero3, "loss"), logged(ddp, "loss")
    assert len(losses) == STEPS and losses == pytest.approx(reference, rel=1e-6)
    assert logged(zero3, "eval_loss") == pytest.approx(logged(ddp, "eval_loss"), rel=1e-6)
    assert losses[1:] != pytest.approx(reference[:-1], rel=1e-6)   # control
