"""Data-parallel engines: DDP (default), FSDP2 (ZeRO-2/3) and DeepSpeed ZeRO 0-3 (optional, imported lazily).

Gradient bookkeeping under sequence parallelism: the model's loss is the global mean over the whole sequence and each
SP rank's parameter gradients are only its tokens' share, so the full gradient is the SUM over the SP group, then the
MEAN over dp replicas. Every engine below averages over all dp * sp ranks; multiplying the loss by sp turns that
average into exactly sum_sp / dp (see `loss_scale`).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional

import torch
import torch.nn as nn

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


class Engine:
    """Wraps the model for data parallelism and owns backward / step, so the train loop is engine-agnostic."""

    def __init__(self, cfg: Config, mesh: Mesh, model: nn.Module):
        self.cfg, self.mesh, self.raw_model = cfg, mesh, model
        self.kind = cfg.parallel.engine
        self.deepspeed = None
        self.experts = None   # parallel.ep > 1: experts split over EP ranks, grads reduced over their replicas only
        if cfg.parallel.ep > 1:
            from .expert_parallel import ExpertParallel
            self.experts = ExpertParallel(mesh, cfg.parallel.ep, model)
        if self.kind == "fsdp" and mesh.world > 1:
            self.model = self._fsdp(model)
        elif mesh.world > 1 and self.kind == "ddp":
            if self.experts is not None:
                torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    model, self.experts.names)
            self.model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[mesh.device.index] if mesh.device.type == "cuda" else None)
        else:
            self.model = model
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        if self.kind == "deepspeed":
            self._init_deepspeed()

    def _fsdp(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        device_mesh = init_device_mesh(self.mesh.device.type, (self.mesh.world,))
        bf16 = self.cfg.train.precision != "fp32"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        reshard = self.cfg.parallel.zero == 3
        for block in model.layers:
            fully_shard(block, mesh=device_mesh, reshard_after_forward=reshard, mp_policy=mp)
        return fully_shard(model, mesh=device_mesh, reshard_after_forward=reshard, mp_policy=mp)

    def _init_deepspeed(self) -> None:
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("parallel.engine", "deepspeed is not installed (pip install 'lsp-hybrid[deepspeed]'), "
                              "or use parallel.engine=ddp / fsdp") from None
        t = self.cfg.train
        ds_config = {
            "train_micro_batch_size_per_gpu": t.micro_batch,
            "gradient_accumulation_steps": t.grad_accum,
            "gradient_clipping": t.grad_clip,
            "zero_optimization": {"stage": self.cfg.parallel.zero},
            "bf16": {"enabled": self.mesh.device.type == "cuda" and t.precision != "fp32"},
            "steps_per_print": 10 ** 9,
        }
        self.deepspeed, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_config,
            dist_init_required=False)
        self.model = self.deepspeed

    def sync_context(self, last_micro: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if last_micro or self.mesh.world == 1:
            return contextlib.nullcontext()
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        if self.kind == "fsdp":
            self.model.set_requires_gradient_sync(False)
            return _restore_sync(self.model)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # loss: [] global-mean loss of one micro-batch
        scaled = loss * loss_scale(self.mesh)
        if self.deepspeed is not None:
            self.deepspeed.backward(scaled)   # DeepSpeed divides by grad_accum itself
        else:
            (scaled / self.cfg.train.grad_accum).backward()

    def step(self) -> Optional[float]:
        """Clip, optimizer step, schedule step, zero grads; returns the pre-clip grad norm."""
        if self.deepspeed is not None:
            self.deepspeed.step()   # the boundary micro-step: DeepSpeed clips, updates and schedules here
            norm = self.deepspeed.get_global_grad_norm()
            return None if norm is None else float(norm)
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
        if self.deepspeed is not None:
            self.deepspeed.zero_grad()
            return
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():   # "scheduler.step() before optimizer.step()" is intended here
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def micro_step(self) -> None:
        """After each non-final micro-batch: DeepSpeed wants engine.step() every micro-batch (it only counts)."""
        if self.deepspeed is not None:
            self.deepspeed.step()

    def zero_grad(self) -> None:
        (self.deepspeed or self.optimizer).zero_grad()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def local_grads(self) -> list:
        """This rank's gradient tensors (FSDP2: the local shards), for the non-finite check; DeepSpeed checks its
        own (it skips a step on overflow), so none."""
        if self.deepspeed is not None:
            return []
        grads = (p.grad for p in self.model.parameters())
        return [g.to_local() if hasattr(g, "to_local") else g for g in grads if g is not None]

    def eval_model(self) -> nn.Module:
        """The module to evaluate: DDP's plain module (no gradient sync needed), else the wrapper (FSDP and DeepSpeed
        gather their shards in forward)."""
        return self.raw_model if self.kind == "ddp" else self.model

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, ckpt_dir: str, step: int, state: dict, config_yaml: str, keep: int) -> Optional[str]:
        """Collective: an atomic checkpoint of the model, optimizer and schedule (+ the trainer's `state`)."""
        from .checkpoint import save_checkpoint

        state = {**state, "scheduler": self.scheduler.state_dict() if self.deepspeed is None else None}
        return save_checkpoint(ckpt_dir, step, self.model, self.optimizer, state, config_yaml, keep=keep,
                               deepspeed_engine=self.deepspeed, experts=self.experts)

    def load(self, path: str) -> dict:
        """Collective: load model, optimizer and schedule in place; returns the trainer state. A checkpoint of
        another model is refused with one line naming the first mismatching parameter (ValueError)."""
        from .checkpoint import load_checkpoint, model_mismatch

        if self.deepspeed is None and (diff := model_mismatch(path, self.model, self.experts)):
            raise ValueError(f"{path} holds another model ({diff})")
        state = load_checkpoint(path, self.model, self.optimizer, deepspeed_engine=self.deepspeed,
                                experts=self.experts)
        if self.deepspeed is None:
            self.scheduler.load_state_dict(state["scheduler"])
        return state


@contextlib.contextmanager
def _restore_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
