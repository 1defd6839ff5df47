"""The "new engine" recipe of docs/architecture.md, done: a fourth engine written from scratch (plain SGD, one
process; not a subclass of `Engine`) is handed to the unchanged trainer, which trains, logs, checkpoints and resumes
through the engine interface alone.

Reference: the same initial weights trained by hand (micro-batch losses / grad_accum, then p -= lr * grad, no
torch.optim); same fp32 operations, so the losses agree to ~1e-7 relative. Control: an engine that forgets the
division by grad_accum is rejected by the same comparison."""
import contextlib
import copy
import os

import pytest
import torch

import lsp.train.trainer as trainer_module
from lsp.run_config import load_config
from lsp.train.checkpoint import load_checkpoint, save_checkpoint
from lsp.train.data import DataLoader
from lsp.train.engine import Engine, TrainEngine

from .conftest import SMALL, TINY

STEPS, ACCUM, LR = 3, 2, 0.05


class SGDEngine:
    """Plain SGD at a constant lr in one process: every method the trainer calls, and nothing else."""

    def __init__(self, cfg, mesh, model):
        assert mesh.world == 1, "a one-process engine"
        self.cfg, self.model = cfg, model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)

    def sync_context(self, last_micro):
        return contextlib.nullcontext()   # nothing to synchronise in one process

    def backward(self, loss):
        # loss: [] global-mean loss of one micro-batch
        (loss / self.cfg.train.grad_accum).backward()

    def micro_step(self):
        pass

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None   # no clipping, so no norm

    def skip_step(self):
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def local_grads(self):
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def eval_model(self):
        return self.model

    def save(self, ckpt_dir, step, state, config_yaml, keep):
        return save_checkpoint(ckpt_dir, step, self.model, self.optimizer, state, config_yaml, keep=keep)

    def load(self, path):
        return load_checkpoint(path, self.model, self.optimizer)


class UnscaledSGDEngine(SGDEngine):
    """Negative control: sums the micro-batch gradients instead of averaging them."""

    def backward(self, loss):
        loss.backward()


def config(tmp_path, name, steps=STEPS, *extra):
    return load_config(TINY, [*SMALL, f"out_dir={tmp_path}", f"name={name}", "parallel.sp=1", f"train.steps={steps}",
                              f"train.grad_accum={ACCUM}", f"optim.lr={LR}", *extra])


def trainer_with(engine, monkeypatch, cfg):
    monkeypatch.setattr(trainer_module, "Engine", engine)   # the only name the trainer builds an engine from
    return trainer_module.Trainer(cfg)


def by_hand(model, cfg, steps):
    """The reference: mean micro-batch loss per step of SGD written out (no torch.optim, no trainer)."""
    data, losses = DataLoader(cfg), []
    for step in range(steps):
        micro = data.micro_batches(step)
        total = 0.0
        for batch in micro:
            loss = model(batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens).loss
            (loss / len(micro)).backward()
            total += loss.item()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
                p.grad = None
        losses.append(total / len(micro))
    return losses


@pytest.mark.parametrize("engine,matches", [(SGDEngine, True), (UnscaledSGDEngine, False)],
                         ids=["sgd", "control-unscaled"])
def test_fourth_engine_trains_through_the_unchanged_trainer(engine, matches, monkeypatch, tmp_path):
    trainer = trainer_with(engine, monkeypatch, config(tmp_path, "sgd"))
    assert type(trainer.engine) is engine and not isinstance(trainer.engine, Engine)   # not the production one
    assert isinstance(trainer.engine, TrainEngine)   # what it implements is the protocol the trainer states
    start = copy.deepcopy(trainer.model)
    losses = trainer.fit()["losses"]
    assert len(losses) == STEPS
    ref = by_hand(start, trainer.cfg, STEPS)
    assert (losses == pytest.approx(ref, rel=1e-6)) is matches, (losses, ref)
    assert abs(losses[-1] - losses[0]) > 1e-3                     # it did train (the steps are not no-ops)


def test_fourth_engine_checkpoints_and_resumes(monkeypatch, tmp_path):
    """engine.save every 2 steps, a new trainer resumes through engine.load: the 4-step losses equal one straight
    4-step run bitwise."""
    straight = trainer_with(SGDEngine, monkeypatch, config(tmp_path, "straight", 4)).fit()["losses"]
    first = trainer_with(SGDEngine, monkeypatch, config(tmp_path, "resumed", 2, "checkpoint.every=2")).fit()
    second = trainer_with(SGDEngine, monkeypatch, config(tmp_path, "resumed", 4, "checkpoint.every=2"))
    assert second.step == 2 and os.path.isdir(os.path.join(second.ckpt_dir, "step_00000002"))
    assert first["losses"] + second.fit()["losses"] == straight
