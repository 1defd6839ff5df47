"""Faults in real processes: a rank dies (torchrun restarts, the run resumes bitwise), SIGKILL during a checkpoint
write, NaN on one rank (skip / stop), determinism across runs and SP sizes, elastic resume at another dp x sp.

One uninterrupted 2-rank SP=2 run (module fixture) is the reference for the others."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest

from lsp.run_config import load_config
from lsp.train.checkpoint import is_complete, latest_checkpoint
from lsp.train.trainer import Trainer

from .conftest import FAULTY, REPO, TINY, run_faulty, run_lsp, signal_mid_run, wait_gone

STEPS = 8
COMMON = [f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "optim.warmup_steps=2",
          "data.eval_batches=1", "checkpoint.every=4", "logging.wandb=false", "logging.tqdm=false",
          "logging.plot=false"]


def losses_of(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if "loss" in r], rows


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    proc = run_lsp("launch", "--nproc-per-node", "2", TINY, f"out_dir={out}", *COMMON, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = os.path.join(out, "tiny-cpu")
    losses, _ = losses_of(run_dir)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    return run_dir, losses


def test_rank_killed_torchrun_restarts_and_resumes_bitwise(straight, tmp_path):
    """Rank 1 dies after step 6 (checkpoint at 4); --max-restarts 1 restarts both ranks, they resume from step 4 and
    the losses equal the uninterrupted run bitwise (steps 1-4: a second identical run; 5-8: after the resume)."""
    _, ref = straight
    proc = run_faulty("launch", "--nproc-per-node", "2", "--max-restarts", "1", TINY, f"out_dir={tmp_path}",
                      *COMMON, timeout=400, env_extra={"LSP_TEST_KILL_AT_STEP": "1:6"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lsp-test: rank 1 dies after step 6" in proc.stderr
    assert "resumed from" in proc.stdout and "step_00000004 at step 4" in proc.stdout
    losses, _ = losses_of(os.path.join(tmp_path, "tiny-cpu"))
    assert losses == ref                                   # bitwise, 8 rows (rows 5-6 of the dead attempt dropped)
    # control: without --max-restarts the same failure fails the launch
    proc = run_faulty("launch", "--nproc-per-node", "2", TINY, f"out_dir={tmp_path}/b", *COMMON, timeout=300,
                      env_extra={"LSP_TEST_KILL_AT_STEP": "1:2"})
    assert proc.returncode != 0


@pytest.mark.slow   # ~25 s alone on 2 cores; fast twins: test_signals.py (2-rank stop, one-process bitwise resume)
def test_sigterm_to_launcher_saves_and_resumes_bitwise(straight, tmp_path):
    """SIGTERM to the `lsp launch` PID after step 2 (as Slurm or `kill` sends it): both ranks finish the step they
    are in, save it, exit 75 and none survives; the re-run resumes there and the 8 losses equal the uninterrupted
    run bitwise."""
    _, ref = straight
    run_dir = os.path.join(tmp_path, "tiny-cpu")
    argv = ["launch", "--nproc-per-node", "2", TINY, f"out_dir={tmp_path}", *COMMON]
    code, _, err, ranks = signal_mid_run(argv, run_dir, signal.SIGTERM, tmp_path)
    assert code == 75 and wait_gone(ranks) == [] and len(ranks) == 2, err[-3000:]
    stopped = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    step = int(stopped[-8:])
    assert 2 <= step < STEPS and step != 4, stopped         # a save of its own, not the every=4 one
    assert f"lsp: SIGTERM on ranks [0, 1]: stopped after step {step}, checkpoint {stopped} written" in err
    done = run_lsp(*argv, timeout=300)
    assert done.returncode == 0 and f"step_{step:08d} at step {step}" in done.stdout, done.stderr[-3000:]
    assert losses_of(run_dir)[0] == ref                     # bitwise


def test_determinism_and_sp1_vs_sp2(straight, tmp_path):
    """Same config and seed in one process at sp=1: equal to the SP=2 run within 1e-5 (fp32 reduction order);
    a different seed is far outside that tolerance (control). Bitwise run-to-run: the test above."""
    _, ref = straight
    sp1 = Trainer(load_config(TINY, [f"out_dir={tmp_path}", "parallel.sp=1", *COMMON])).fit()["losses"]
    assert sp1 == pytest.approx(ref, rel=1e-5, abs=1e-5)
    other = Trainer(load_config(TINY, [f"out_dir={tmp_path}/s", "parallel.sp=1", "train.seed=1", "train.steps=2",
                                       *COMMON[1:]]))
    assert abs(other.train_step()["loss"] - ref[0]) > 1e-3


def test_elastic_resume_at_other_dp_sp(straight, tmp_path):
    """The step-4 checkpoint of (dp=1, sp=2) resumes at (dp=2, sp=1) (2 processes, same global batch) and at
    (dp=1, sp=1) (one process); the next loss equals the uninterrupted run's step 5 within 1e-5."""
    run_dir, ref = straight
    for name in ("dp2", "dp1"):
        os.makedirs(tmp_path / name / "ckpt")
        shutil.copytree(os.path.join(run_dir, "checkpoints", "step_00000004"),
                        tmp_path / name / "ckpt" / "step_00000004")
    proc = run_lsp("launch", "--nproc-per-node", "2", TINY, f"out_dir={tmp_path}/dp2", *COMMON, "train.steps=5",
                   "parallel.sp=1", "train.micro_batch=8", f"checkpoint.dir={tmp_path}/dp2/ckpt", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dp=2 sp=1" in proc.stdout and "at step 4" in proc.stdout
    dp2, _ = losses_of(os.path.join(tmp_path, "dp2", "tiny-cpu"))
    assert dp2[0] == pytest.approx(ref[4], rel=1e-5)
    trainer = Trainer(load_config(TINY, [f"out_dir={tmp_path}/dp1", *COMMON, "parallel.sp=1",
                                         f"checkpoint.dir={tmp_path}/dp1/ckpt"]))
    assert trainer.step == 4
    assert trainer.train_step()["loss"] == pytest.approx(ref[4], rel=1e-5)
    # control: the step-4 loss (no resume of the update) is far from step 5's
    assert abs(ref[3] - ref[4]) > 1e-3


def test_nonfinite_on_one_rank_is_skipped_on_every_rank(straight, tmp_path):
    """NaN loss on rank 1 at step 3 of a 2-rank run with on_nonfinite=skip: both ranks report it and skip the update;
    step 4's loss equals that of a model updated at steps 1, 2 only (independent in-process reference)."""
    proc = run_faulty("launch", "--nproc-per-node", "2", TINY, f"out_dir={tmp_path}", *COMMON, "train.steps=4",
                      "train.on_nonfinite=skip", timeout=300, env_extra={"LSP_TEST_NONFINITE_AT": "1:3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        # the loss is bad on rank 1 only; DDP's all-reduce spreads NaN gradients to rank 0
        assert (f"lsp: rank {rank}: non-finite loss on ranks [1], gradients on ranks [0, 1] at step 3; update skipped"
                in proc.stdout)
    losses, rows = losses_of(os.path.join(tmp_path, "tiny-cpu"))
    assert [r["skipped_steps"] for r in rows if "loss" in r] == [0, 0, 1, 1]
    assert losses[2] is None and math.isfinite(losses[3])        # NaN is written as null: strict JSON
    with open(os.path.join(tmp_path, "tiny-cpu", "metrics.jsonl")) as f:
        assert "NaN" not in f.read()
    ref = Trainer(load_config(TINY, [f"out_dir={tmp_path}/ref", "parallel.sp=1", *COMMON, "train.steps=4"]))
    ref.train_step(), ref.train_step()
    ref.step = ref.data.state.step = 3
    ref.engine.scheduler.step()
    assert losses[3] == pytest.approx(ref.train_step()["loss"], rel=1e-5)
    # control: the uninterrupted run (which did update at step 3) has a clearly different step-4 loss
    assert abs(losses[3] - straight[1][3]) > 1e-3


def test_nonfinite_stop_exits_and_keeps_last_checkpoint(tmp_path):
    proc = run_faulty("train", TINY, f"out_dir={tmp_path}", *COMMON, "parallel.sp=1", "checkpoint.every=2",
                      timeout=300, env_extra={"LSP_TEST_NONFINITE_AT": "0:3"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    ckpts = os.path.join(tmp_path, "tiny-cpu", "checkpoints")
    assert last == (f"error: non-finite loss on ranks [0], gradients on ranks [0] at step 3; stopped because "
                    f"train.on_nonfinite=stop; last complete checkpoint: {ckpts}/step_00000002")
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000002"]
    # the run continues from there once the cause is gone
    proc = run_lsp("train", TINY, f"out_dir={tmp_path}", *COMMON, "parallel.sp=1", "checkpoint.every=2",
                   "train.steps=4", timeout=300)
    assert proc.returncode == 0 and "at step 2" in proc.stdout, proc.stderr[-2000:]


def test_sigkill_during_checkpoint_write_keeps_last_good(tmp_path):
    """SIGKILL while step 4's checkpoint is half written (DCP shards on disk, trainer.pt not yet): step 2 stays the
    newest complete checkpoint, the restart resumes from it and ends bitwise equal to an uninterrupted run."""
    args = [TINY, f"out_dir={tmp_path}", *COMMON, "parallel.sp=1", "checkpoint.every=2", "train.steps=6"]
    env = dict(os.environ, OMP_NUM_THREADS="1", LSP_TEST_CKPT_SLEEP="4:120")
    proc = subprocess.Popen([sys.executable, "-m", FAULTY, "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        for line in proc.stdout:
            if "lsp-test: checkpoint write paused" in line:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    ckpts = os.path.join(tmp_path, "tiny-cpu", "checkpoints")
    assert os.path.isdir(os.path.join(ckpts, "step_00000004.tmp"))                 # the torn write is there...
    assert os.path.isfile(os.path.join(ckpts, "step_00000004.tmp", ".metadata"))
    assert not is_complete(os.path.join(ckpts, "step_00000004.tmp"))
    assert latest_checkpoint(ckpts) == os.path.join(ckpts, "step_00000002")        # ...and never read
    done = run_lsp("train", *args, timeout=300)
    assert done.returncode == 0 and "step_00000002 at step 2" in done.stdout, done.stderr[-2000:]
    resumed, _ = losses_of(os.path.join(tmp_path, "tiny-cpu"))
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000004", "step_00000006"]
    ref = Trainer(load_config(TINY, [f"out_dir={tmp_path}/ref", *COMMON, "parallel.sp=1", "checkpoint.every=2",
                                     "train.steps=6"])).fit()
    assert resumed == ref["losses"]                                                   # bitwise


def test_production_code_reads_no_test_switches():
    """The faults above are injected by tests/reliability/faulty_entry.py around the trainer's seams; no module of
    lsp/ reads an LSP_TEST_* variable. Control: the same scan finds them in the test entry."""
    def readers(root):
        found = []
        for folder, _, files in os.walk(root):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(folder, name)) as f:
                        found += [name] * ("LSP_TEST_" in f.read())
        return found
    assert readers(os.path.join(REPO, "lsp")) == []
    assert "faulty_entry.py" in readers(os.path.join(REPO, "tests", "reliability"))
