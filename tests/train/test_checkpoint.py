"""Checkpoints: atomic save (crash leaves the previous one), never overwritten, bitwise-identical resume on CPU."""
import os

import pytest

from lsp.run_config import ConfigError, load_config
from lsp.train import checkpoint as ckpt
from lsp.train.trainer import Trainer

from .conftest import SMALL, TINY, run_lsp

STEPS = 6


def make_cfg(tmp_path, name, *extra):
    return load_config(None, SMALL + [f"out_dir={tmp_path}", f"name={name}", f"train.steps={STEPS}",
                                      "checkpoint.every=0", "train.grad_accum=2", *extra])


def run_until(cfg, stop):
    trainer = Trainer(cfg)
    losses = [trainer.train_step()["loss"] for _ in range(stop - trainer.step)]
    return trainer, losses


def test_resume_is_bitwise_identical(tmp_path):
    straight = Trainer(make_cfg(tmp_path, "straight")).fit()["losses"]
    assert len(straight) == STEPS

    cfg = make_cfg(tmp_path, "resumed")
    first, head = run_until(cfg, 3)
    first.save()
    del first
    second = Trainer(cfg)                      # picks up step 3 from `latest`
    assert second.step == 3 and second.data.state.step == 3
    tail = second.fit()["losses"]
    assert head + tail == straight             # bitwise, not approximately

    # negative control: resuming the weights but not the optimizer state changes the next losses
    cold = Trainer(make_cfg(tmp_path, "resumed", "checkpoint.resume=false"))
    path = ckpt.step_dir(cfg.checkpoint_dir, 3)
    cold.step = cold.data.state.step = 3
    ckpt.load_checkpoint(path, cold.model)     # model only: fresh AdamW moments
    cold.engine.scheduler.last_epoch = 3
    assert cold.train_step()["loss"] == straight[3]   # same weights -> same loss at the first resumed step
    assert cold.train_step()["loss"] != straight[4]   # but a different update

    # a finished run is not silently retrained, and resume=false refuses to mix with existing checkpoints
    done = Trainer(cfg).fit()
    assert done["losses"] == [] and done["step"] == STEPS and "eval_accuracy" in done
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        Trainer(make_cfg(tmp_path, "resumed", "checkpoint.resume=false")).fit()


def test_atomic_save_and_latest(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "atomic", "checkpoint.keep=2")
    trainer, _ = run_until(cfg, 1)
    root = cfg.checkpoint_dir
    good = trainer.save()
    assert os.path.basename(good) == "step_00000001" and ckpt.latest_checkpoint(root) == good
    weights = os.path.join(good, "__0_0.distcp")
    before = os.stat(weights).st_mtime_ns
    trainer.train_step()

    # crash in the middle of the next save: after the shards are written, before the rename
    def crash(src, dst):
        raise OSError("simulated crash")
    monkeypatch.setattr(ckpt, "_publish", crash)
    with pytest.raises(OSError, match="simulated crash"):
        trainer.save()
    monkeypatch.undo()
    assert os.path.isdir(os.path.join(root, "step_00000002.tmp"))
    assert ckpt.latest_checkpoint(root) == good                     # the partial one is never picked
    with open(os.path.join(root, "latest")) as f:
        assert f.read().strip() == "step_00000001"

    # a complete checkpoint is never overwritten
    trainer.step = 1
    assert trainer.save() is None and os.stat(weights).st_mtime_ns == before
    trainer.step = 2
    assert os.path.basename(trainer.save()) == "step_00000002"     # the stale .tmp is replaced
    assert not os.path.exists(os.path.join(root, "step_00000002.tmp"))

    # a `latest` pointing at an incomplete folder falls back to the newest complete one
    os.makedirs(os.path.join(root, "step_00000009"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000009\n")
    assert ckpt.latest_checkpoint(root).endswith("step_00000002")

    # keep=2 prunes the oldest complete checkpoints
    for s in (3, 4):
        trainer.step = s
        trainer.save()
    kept = sorted(n for n in os.listdir(root) if ckpt.STEP_DIR.match(n) and ckpt.is_complete(os.path.join(root, n)))
    assert kept == ["step_00000003", "step_00000004"]


def test_lr_schedule():
    from lsp.train.engine import lr_at
    cfg = load_config(None, ["train.steps=100", "optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr=0.1"])
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0) and lr_at(cfg, 55) == pytest.approx(0.55)
    assert lr_at(cfg, 100) == pytest.approx(0.1) and lr_at(cfg, 1000) == pytest.approx(0.1)
    assert all(lr_at(cfg, s) >= lr_at(cfg, s + 1) for s in range(10, 120))


def test_model_changed_under_run_name_is_one_line(tmp_path):
    """Same run name, another model: one line naming the first mismatching parameter and the way out, exit 2 (it was
    a 55-line DCP traceback); the unchanged model resumes from the same folder (control)."""
    over = ["parallel.sp=1", *SMALL, f"out_dir={tmp_path}", "name=r", "train.steps=2", "checkpoint.every=0"]
    trainer, _ = run_until(load_config(TINY, over), 1)
    trainer.save()
    args = ["train", TINY, *over]
    proc = run_lsp(*args, "model.hidden_size=48", timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    ckpt_dir = os.path.join(tmp_path, "r", "checkpoints", "step_00000001")
    assert proc.stderr.startswith(f"config error: model: {ckpt_dir} holds another model (model.")
    assert "is [" in proc.stderr and "pick a new name=" in proc.stderr
    assert ckpt.model_mismatch(ckpt_dir, trainer.model) is None                  # control: same model matches
    proc = run_lsp(*args, timeout=120)
    assert proc.returncode == 0 and "at step 1" in proc.stdout, proc.stderr[-2000:]
