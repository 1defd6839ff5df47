"""The data-parallel engines by name: what the run config and the planner ask of each one (torch-free).

One class per engine, registered once by name: its ZeRO stages (the config check), the package it needs, and its
memory and communication formulas. `lsp.train.engine` gives each a runtime class (wrapping, backward / step,
checkpoint hooks) that subclasses it, so one engine's config check, formulas and runtime live in one class tree;
`lsp.plan` asks `engine_spec(name)` without importing lsp.train (or torch). An unknown name raises.

Per-GPU bytes per parameter after the engine shards over all n = dp·sp ranks (the engines average over the whole
world): fp32 weight 4 + gradient 4 + AdamW m, v 8 = 16, of which

    ddp                       16, + 4 of all-reduce buckets (n > 1)
    fsdp (FSDP2)     zero=2   2 (bf16 weights kept unsharded from forward to backward) + 16/n;   zero=3   16/n
    deepspeed        zero=0   16 + 4 buckets;   zero=1   8 + 8/n;   zero=2   4 + 12/n;   zero=3   16/n

Gradient reduction, bytes rank 0 receives per step for P bytes of fp32 parameters over W ranks: ring all-reduce
2(W-1)/W·P (DDP, ZeRO-0/1); sharded (ZeRO-2/3): reduce-scatter (W-1)/W·P plus the all-gathers of the parameters (bf16
under mixed precision) before forward and, resharded (ZeRO-3), again before backward.
"""
from __future__ import annotations

import importlib.util
from typing import Dict, Optional, Tuple

ZERO_STAGES = (0, 1, 2, 3)
STATE_KINDS = ("parameters", "gradients", "optimizer")   # the keys of `shard_states`


class EngineSpec:
    """An engine as the config and the planner see it. Subclasses set `name`, `zero_stages` and the formulas."""

    name: str = ""
    zero_stages: Tuple[int, ...] = ()
    package: Optional[str] = None   # the module it imports at run time (an optional extra), if any
    expert_parallel: bool = False   # runs parallel.ep > 1: MoE experts split over EP ranks, reduced apart

    @classmethod
    def zero_problem(cls, zero: int) -> Optional[str]:
        """None when `zero` is a stage of this engine, else the one-line reason (for `parallel.zero`)."""
        if zero in cls.zero_stages:
            return None
        if zero not in ZERO_STAGES:
            return f"{zero} is not one of {', '.join(map(str, ZERO_STAGES))}"
        return cls._other_stage(zero)

    @classmethod
    def _other_stage(cls, zero: int) -> str:
        others = " or ".join(n for n, spec in ENGINES.items() if zero in spec.zero_stages)
        return f"{zero} needs parallel.engine={others} ({cls.name} has ZeRO {', '.join(map(str, cls.zero_stages))})"

    @classmethod
    def missing_package(cls) -> Optional[str]:
        """None when the engine can run here, else the one-line reason (for `parallel.engine`)."""
        if cls.package is None or importlib.util.find_spec(cls.package) is not None:
            return None
        others = " / ".join(n for n, spec in ENGINES.items() if spec.package is None)
        return (f"{cls.package} is not installed (pip install 'lsp-hybrid[{cls.package}]'), "
                f"or use parallel.engine={others}")

    # ----------------------------------------------------------------------------------------- planner formulas
    @classmethod
    def state_bytes_per_param(cls, zero: int, ranks: int) -> float:
        """fp32 weight + gradient + AdamW (m, v) bytes per parameter on one GPU after sharding over `ranks`,
        gradient buckets included."""
        raise NotImplementedError(f"engine {cls.name!r} has no state_bytes_per_param")

    @classmethod
    def shard_states(cls, unsharded: Dict[str, float], zero: int, world: int) -> Dict[str, float]:
        """Per-GPU bytes of (parameters, gradients, optimizer) after sharding over `world` ranks, from the
        unsharded fp32 bytes one step held (`lsp plan --measure`)."""
        raise NotImplementedError(f"engine {cls.name!r} has no shard_states")

    @classmethod
    def dp_reduction_bytes(cls, param_bytes: float, zero: int, world: int, bf16: bool) -> float:
        """Bytes rank 0 receives per step reducing gradients (and gathering parameters) over `world` ranks."""
        raise NotImplementedError(f"engine {cls.name!r} has no dp_reduction_bytes")


ENGINES: Dict[str, type] = {}


def register_engine(spec: type) -> type:
    """Class decorator: registers an EngineSpec subclass under its `name` (once)."""
    assert spec.name and spec.name not in ENGINES, f"engine name {spec.name!r} is empty or registered twice"
    ENGINES[spec.name] = spec
    return spec


def engine_spec(name: str) -> type:
    """The registered EngineSpec class called `name`; an unknown name raises ValueError naming the choices."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; registered: {', '.join(ENGINES)}")
    return ENGINES[name]


def engine_names() -> Tuple[str, ...]:
    return tuple(ENGINES)


def _replicated_bytes_per_param(ranks: int) -> float:
    return 16.0 + (4.0 if ranks > 1 else 0.0)   # + the all-reduce buckets: fp32, allocated once


def _replicated(unsharded: Dict[str, float], world: int) -> Dict[str, float]:
    """Every state whole on every rank, plus all-reduce buckets the size of the fp32 parameters (n > 1)."""
    p, g, o = (unsharded[k] for k in STATE_KINDS)
    return {"parameters": p, "gradients": g + (p if world > 1 else 0.0), "optimizer": o}


def _all_reduce_bytes(param_bytes: float, world: int) -> float:
    return 2 * (world - 1) / world * param_bytes


def _sharded_reduction_bytes(param_bytes: float, world: int, gathers: int, bf16: bool) -> float:
    return (world - 1) / world * param_bytes * (1 + gathers * (0.5 if bf16 else 1.0))


@register_engine
class DDP(EngineSpec):
    """torch DistributedDataParallel: everything replicated, gradients all-reduced in buckets."""

    name, zero_stages = "ddp", (0,)
    expert_parallel = True   # MoE experts reduced over their own replicas (lsp/train/expert_parallel.py)

    @classmethod
    def state_bytes_per_param(cls, zero, ranks):
        return _replicated_bytes_per_param(ranks)

    @classmethod
    def shard_states(cls, unsharded, zero, world):
        return _replicated(unsharded, world)

    @classmethod
    def dp_reduction_bytes(cls, param_bytes, zero, world, bf16):
        return _all_reduce_bytes(param_bytes, world)


@register_engine
class FSDP(EngineSpec):
    """FSDP2 (`fully_shard` per block): fp32 shards at every stage; ZeRO-2 does not reshard after forward, so the
    bf16 unsharded weights stay from forward to backward."""

    name, zero_stages = "fsdp", (2, 3)
    expert_parallel = True   # experts outside fully_shard, reduced over their own replicas (lsp/train/engine.py)

    @classmethod
    def _other_stage(cls, zero):
        return f"{zero} with engine=fsdp; FSDP2 shards grads (2) or params too (3)"

    @classmethod
    def state_bytes_per_param(cls, zero, ranks):
        return (2.0 if zero == 2 else 0.0) + 16.0 / ranks

    @classmethod
    def shard_states(cls, unsharded, zero, world):
        p, g, o = (unsharded[k] for k in STATE_KINDS)
        kept_bf16 = p / 2 if zero == 2 and world > 1 else 0.0
        return {"parameters": p / world + kept_bf16, "gradients": g / world, "optimizer": o / world}

    @classmethod
    def dp_reduction_bytes(cls, param_bytes, zero, world, bf16):
        return _sharded_reduction_bytes(param_bytes, world, 2 if zero == 3 else 1, bf16)


@register_engine
class DeepSpeed(EngineSpec):
    """DeepSpeed ZeRO 0-3: stage 1 shards the optimizer state, 2 the gradients too, 3 the parameters too."""

    name, zero_stages, package = "deepspeed", ZERO_STAGES, "deepspeed"

    @classmethod
    def state_bytes_per_param(cls, zero, ranks):
        if zero == 0:
            return _replicated_bytes_per_param(ranks)
        sharded = {1: 8.0, 2: 12.0, 3: 16.0}[zero]   # m, v; + gradients; + weights
        return 16.0 - sharded + sharded / ranks

    @classmethod
    def shard_states(cls, unsharded, zero, world):
        if zero == 0:
            return _replicated(unsharded, world)
        p, g, o = (unsharded[k] for k in STATE_KINDS)
        return {"parameters": p / world if zero == 3 else p, "gradients": g / world if zero >= 2 else g,
                "optimizer": o / world}

    @classmethod
    def dp_reduction_bytes(cls, param_bytes, zero, world, bf16):
        if zero < 2:
            return _all_reduce_bytes(param_bytes, world)
        return _sharded_reduction_bytes(param_bytes, world, 2 if zero == 3 else 1, bf16)
