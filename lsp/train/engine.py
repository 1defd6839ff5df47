"""Data-parallel engines: DDP (default), FSDP2 (ZeRO-2/3) and DeepSpeed ZeRO 0-3 (optional, imported lazily), one
class each behind the `Engine` interface, registered by the name of the `lsp.engines` spec each subclasses.

Gradient bookkeeping under sequence parallelism: the model's loss is the global mean over the whole sequence and each
SP rank's parameter gradients are only its tokens' share, so the full gradient is the SUM over the SP group, then the
MEAN over dp replicas. Every engine below averages over all dp * sp ranks; multiplying the loss by sp turns that
average into exactly sum_sp / dp (see `loss_scale`).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Dict, Optional, Protocol, runtime_checkable

import torch
import torch.nn as nn

from lsp.engines import DDP, FSDP, DeepSpeed, engine_spec
from lsp.models.build import build_optimizer
from lsp.run_config import Config, ConfigError

from .dist import Mesh


def loss_scale(mesh: Mesh) -> float:
    return float(mesh.sp)


def lr_at(cfg: Config, step: int) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr at train.steps."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(cfg: Config, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(cfg, step) / cfg.optim.lr)


@runtime_checkable
class TrainEngine(Protocol):
    """The methods and attributes the trainer uses, and all it uses (tests/train/test_engine_seam.py proves it)."""

    model: nn.Module

    def sync_context(self, last_micro: bool): ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def micro_step(self) -> None: ...
    def step(self) -> Optional[float]: ...
    def skip_step(self) -> None: ...
    def zero_grad(self) -> None: ...
    @property
    def lr(self) -> float: ...
    def local_grads(self) -> list: ...
    def eval_model(self) -> nn.Module: ...
    def save(self, ckpt_dir: str, step: int, state: dict, config_yaml: str, keep: int) -> Optional[str]: ...
    def load(self, path: str) -> dict: ...


class Engine:
    """The engine interface the trainer uses: wraps the model for data parallelism and owns backward / step and the
    checkpoint hooks, so the train loop names no engine. `Engine(cfg, mesh, model)` builds the class registered
    for `cfg.parallel.engine` (`engine_class`); this base is the plain torch-optimizer engine the DDP and FSDP2
    classes share, each subclass also inheriting its `lsp.engines` spec (name, config check, memory formulas).
    What the trainer calls is `TrainEngine`; an engine outside this tree only has to provide that."""

    def __new__(cls, cfg: Config, mesh: Mesh, model: nn.Module):
        return super().__new__(engine_class(cfg.parallel.engine) if cls is Engine else cls)

    def __init__(self, cfg: Config, mesh: Mesh, model: nn.Module):
        self.cfg, self.mesh, self.raw_model = cfg, mesh, model
        self.experts = None   # parallel.ep > 1: experts split over EP ranks, grads reduced over their replicas only
        if cfg.parallel.ep > 1:
            from .expert_parallel import ExpertParallel
            self.experts = ExpertParallel(mesh, cfg.parallel.ep, model)
        self.model = self.wrap(model) if mesh.world > 1 else model
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model wrapped for data parallelism over mesh.world > 1 ranks."""
        raise NotImplementedError(f"engine {self.name!r} does not wrap a model")

    def sync_context(self, last_micro: bool):
        """Skip the gradient reduction on all but the last micro-batch of a step."""
        if last_micro or self.mesh.world == 1:
            return contextlib.nullcontext()
        return self._no_sync()

    def _no_sync(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # loss: [] global-mean loss of one micro-batch
        (loss * loss_scale(self.mesh) / self.cfg.train.grad_accum).backward()

    def step(self) -> Optional[float]:
        """Clip, optimizer step, schedule step, zero grads; returns the pre-clip grad norm."""
        norm = None
        if self.experts is not None:
            self.experts.reduce_grads()
        if self.cfg.train.grad_clip > 0:
            clip = torch.nn.utils.clip_grad_norm_ if self.experts is None else self.experts.clip_grad_norm
            norm = float(clip(list(self.model.parameters()), self.cfg.train.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip_step(self) -> None:
        """Drop this step's gradients without an update; the schedule still advances (it follows the step)."""
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():   # "scheduler.step() before optimizer.step()" is intended here
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def micro_step(self) -> None:
        """After each non-final micro-batch (nothing to do for a torch optimizer)."""

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def local_grads(self) -> list:
        """This rank's gradient tensors (FSDP2: the local shards), for the non-finite check."""
        grads = (p.grad for p in self.model.parameters())
        return [g.to_local() if hasattr(g, "to_local") else g for g in grads if g is not None]

    def eval_model(self) -> nn.Module:
        """The module to evaluate (a sharding wrapper gathers its shards in forward)."""
        return self.model

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, ckpt_dir: str, step: int, state: dict, config_yaml: str, keep: int) -> Optional[str]:
        """Collective: an atomic checkpoint of the model, optimizer and schedule (+ the trainer's `state`)."""
        from .checkpoint import save_checkpoint

        state = {**state, "scheduler": self.scheduler.state_dict()}
        return save_checkpoint(ckpt_dir, step, self.model, self.optimizer, state, config_yaml, keep=keep,
                               experts=self.experts)

    def load(self, path: str) -> dict:
        """Collective: load model, optimizer and schedule in place; returns the trainer state. A checkpoint of
        another model is refused with one line naming the first mismatching parameter (ValueError)."""
        from .checkpoint import load_checkpoint, model_mismatch

        if diff := model_mismatch(path, self.model, self.experts):
            raise ValueError(f"{path} holds another model ({diff})")
        state = load_checkpoint(path, self.model, self.optimizer, experts=self.experts)
        self.scheduler.load_state_dict(state["scheduler"])
        return state


ENGINE_CLASSES: Dict[str, type] = {}


def runtime_engine(cls: type) -> type:
    """Class decorator: the runtime class of the registered engine spec it subclasses (`cls.name`)."""
    assert issubclass(cls, engine_spec(cls.name)), f"{cls.__name__} must subclass lsp.engines' {cls.name!r} spec"
    ENGINE_CLASSES[cls.name] = cls
    return cls


def engine_class(name: str) -> type:
    """The Engine subclass for `name`: ValueError for a name lsp.engines does not register, or one without a
    runtime class here."""
    engine_spec(name)
    if name not in ENGINE_CLASSES:
        raise ValueError(f"engine {name!r} is registered in lsp.engines but has no runtime class in lsp.train.engine")
    return ENGINE_CLASSES[name]


@runtime_engine
class DDPEngine(Engine, DDP):
    """torch DistributedDataParallel (one process: the plain model)."""

    def wrap(self, model):
        device = self.mesh.device
        if self.experts is not None:   # reduced over their own replicas (ExpertParallel.reduce_grads)
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, self.experts.names)
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def _no_sync(self):
        return self.model.no_sync()

    def eval_model(self):
        return self.raw_model   # no gradient sync needed to evaluate


@runtime_engine
class FSDPEngine(Engine, FSDP):
    """FSDP2: `fully_shard` per block and on the root; ZeRO-3 reshards after forward, ZeRO-2 keeps the gathered
    weights until backward. Under parallel.ep > 1 the routed experts stay out of fully_shard (`ignored_params`):
    already split over the EP group, they are kept whole and reduced over their own replicas, as under DDP."""

    def wrap(self, model):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        device_mesh = init_device_mesh(self.mesh.device.type, (self.mesh.world,))
        bf16 = self.cfg.train.precision != "fp32"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        reshard = self.cfg.parallel.zero == 3
        ignored = set(self.experts.params) if self.experts is not None else None
        for block in model.layers:
            fully_shard(block, mesh=device_mesh, reshard_after_forward=reshard, mp_policy=mp, ignored_params=ignored)
        return fully_shard(model, mesh=device_mesh, reshard_after_forward=reshard, mp_policy=mp,
                           ignored_params=ignored)

    def _no_sync(self):
        self.model.set_requires_gradient_sync(False)
        return _restore_sync(self.model)


@runtime_engine
class DeepSpeedEngine(Engine, DeepSpeed):
    """DeepSpeed ZeRO 0-3 (imported lazily): it owns gradient accumulation, clipping, the optimizer and schedule
    steps, overflow skipping and its own checkpoint format."""

    def __init__(self, cfg: Config, mesh: Mesh, model: nn.Module):
        super().__init__(cfg, mesh, model)
        if (missing := self.missing_package()) is not None:
            raise ConfigError("parallel.engine", missing)
        import deepspeed
        t = cfg.train
        ds_config = {
            "train_micro_batch_size_per_gpu": t.micro_batch,
            "gradient_accumulation_steps": t.grad_accum,
            "gradient_clipping": t.grad_clip,
            "zero_optimization": {"stage": cfg.parallel.zero},
            "bf16": {"enabled": mesh.device.type == "cuda" and t.precision != "fp32"},
            "steps_per_print": 10 ** 9,
        }
        self.deepspeed, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_config,
            dist_init_required=False)
        self.model = self.deepspeed

    def wrap(self, model):
        return model   # deepspeed.initialize wraps it

    def backward(self, loss):
        self.deepspeed.backward(loss * loss_scale(self.mesh))   # DeepSpeed divides by grad_accum itself

    def step(self):
        self.deepspeed.step()   # the boundary micro-step: DeepSpeed clips, updates and schedules here
        norm = self.deepspeed.get_global_grad_norm()
        return None if norm is None else float(norm)

    def skip_step(self):
        self.deepspeed.zero_grad()

    def micro_step(self):
        self.deepspeed.step()   # DeepSpeed wants engine.step() every micro-batch (it only counts)

    def zero_grad(self):
        self.deepspeed.zero_grad()

    def local_grads(self):
        return []   # DeepSpeed checks its own gradients (it skips a step on overflow)

    def save(self, ckpt_dir, step, state, config_yaml, keep):
        from .checkpoint import save_checkpoint

        state = {**state, "scheduler": None}   # inside DeepSpeed's own checkpoint
        return save_checkpoint(ckpt_dir, step, self.model, self.optimizer, state, config_yaml, keep=keep,
                               deepspeed_engine=self.deepspeed)

    def load(self, path):
        from .checkpoint import load_checkpoint

        return load_checkpoint(path, self.model, self.optimizer, deepspeed_engine=self.deepspeed)


@contextlib.contextmanager
def _restore_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
