"""Signals from an operator or a scheduler: sent to the `lsp launch` PID alone, they reach every rank (no orphan),
the ranks finish the step, save and exit 75; with `checkpoint.save_on_signals=[]` they die at once, unsaved.
The bitwise resume after a SIGTERM is in test_faults.py (it shares the uninterrupted reference run)."""
import json
import os
import signal
import subprocess
import time

import pytest

from lsp.cli import STOPPED_EXIT, build_parser, torchrun_command
from lsp.run_config import load_config
from lsp.train.checkpoint import latest_checkpoint
from lsp.train.trainer import Trainer

from .conftest import REPO, TINY, run_lsp, signal_mid_run, wait_gone
from .faulty_entry import worker_command

FAST = ["train.steps=40", "train.log_every=1", "train.eval_every=0", "data.eval_batches=1", "logging.wandb=false",
        "logging.tqdm=false", "logging.plot=false"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1], ids=["SIGINT", "SIGUSR1"])
def test_signal_to_launcher_saves_and_leaves_no_rank(tmp_path, sig):
    run_dir = os.path.join(tmp_path, "tiny-cpu")
    code, out, err, ranks = signal_mid_run(["launch", "--nproc-per-node", "2", TINY, f"out_dir={tmp_path}", *FAST],
                                           run_dir, sig, tmp_path)
    assert len(ranks) == 2
    assert wait_gone(ranks) == []                          # no orphan: every rank got the signal and exited
    assert code == STOPPED_EXIT, err[-3000:]
    name = signal.Signals(sig).name
    saved = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    assert saved is not None and f"lsp: {name} on ranks [0, 1]: stopped after step {int(saved[-8:])}" in err
    assert 2 <= int(saved[-8:]) < 40                        # saved at the step where it stopped, not at the end
    assert f"lsp launch: {name}: the ranks were stopped; last complete checkpoint: {saved}" in err


def test_no_save_signals_die_unsaved(tmp_path):
    """Control: with save_on_signals=[] the same SIGTERM still reaches and ends both ranks, but nothing is saved."""
    run_dir = os.path.join(tmp_path, "tiny-cpu")
    code, out, err, ranks = signal_mid_run(["launch", "--nproc-per-node", "2", TINY, f"out_dir={tmp_path}", *FAST,
                                            "checkpoint.save_on_signals=[]"], run_dir, signal.SIGTERM, tmp_path)
    assert wait_gone(ranks) == [] and len(ranks) == 2
    assert code == STOPPED_EXIT and "last complete checkpoint: none" in err, err[-3000:]
    assert latest_checkpoint(os.path.join(run_dir, "checkpoints")) is None


def test_old_subprocess_wrapper_leaves_orphans(tmp_path):
    """Negative control for the orphan check: the previous `lsp launch` (subprocess.call around torchrun) dies on
    SIGTERM and its ranks live on; the same check must report them (they are killed afterwards)."""
    args = build_parser().parse_args(["launch", "--nproc-per-node", "2", TINY, f"out_dir={tmp_path}", *FAST])
    wrapper = f"import subprocess, sys; sys.exit(subprocess.call({worker_command(torchrun_command(args))!r}))"
    code, _, _, procs = signal_mid_run(["-c", wrapper], os.path.join(tmp_path, "tiny-cpu"), signal.SIGTERM,
                                       tmp_path)
    assert code == -signal.SIGTERM
    assert len(wait_gone(procs, seconds=2.0)) >= 2         # torchrun's agent and its ranks survived the wrapper


def test_one_process_ctrl_c_saves_and_resumes_bitwise(tmp_path):
    """`lsp train` in one process: SIGINT (Ctrl-C) ends the current step, saves it, exits 75; the re-run resumes
    there and its losses equal an uninterrupted run bitwise."""
    run_dir = os.path.join(tmp_path, "tiny-cpu")
    argv = ["train", TINY, f"out_dir={tmp_path}", "parallel.sp=1", *FAST, "train.steps=12"]
    code, out, err, _ = signal_mid_run(argv, run_dir, signal.SIGINT, tmp_path)
    assert code == STOPPED_EXIT, err[-3000:]
    saved = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    assert err.strip().splitlines()[-1].startswith(f"lsp: SIGINT on ranks [0]: stopped after step {int(saved[-8:])}")
    done = run_lsp(*argv, timeout=120)
    assert done.returncode == 0 and f"at step {int(saved[-8:])}" in done.stdout, done.stderr[-2000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        resumed = [row["loss"] for row in map(json.loads, f) if "loss" in row]
    ref = Trainer(load_config(TINY, [f"out_dir={tmp_path}/ref", "parallel.sp=1", *FAST, "train.steps=12"])).fit()
    assert resumed == ref["losses"]                         # bitwise, 12 rows


FAKE_SRUN = """#!/usr/bin/env bash
# a job step that behaves like lsp launch: SIGUSR1 / SIGTERM -> save, exit 75
echo "$$" > "$SHIM_LOG.srun"
trap 'kill $child; exit 75' USR1 TERM
sleep 30 & child=$!
wait $child
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ $1 == show ]]; then echo node1; else echo "$*" >> "$SHIM_LOG"; fi
"""


@pytest.mark.parametrize("who,requeued", [("batch-usr1", True), ("step-term", False)])
def test_slurm_script_requeues_on_time_limit_signal_only(tmp_path, who, requeued):
    """launch/slurm.sbatch with fake `srun` / `scontrol`: the time-limit SIGUSR1 (to the batch shell) reaches the step,
    which saves and exits 75, and the job is requeued; a step stopped by SIGTERM (scancel) exits 75 unrequeued."""
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    log = tmp_path / "log"
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SHIM_LOG=str(log), SLURM_JOB_NODELIST="n1",
               SLURM_NNODES="1", SLURM_JOB_ID="42")
    proc = subprocess.Popen(["bash", os.path.join(REPO, "launch", "slurm.sbatch"), "c.yaml"], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not os.path.exists(f"{log}.srun") and time.monotonic() < deadline:
        time.sleep(0.05)
    if who == "batch-usr1":
        proc.send_signal(signal.SIGUSR1)
    else:
        os.kill(int((tmp_path / "log.srun").read_text()), signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == STOPPED_EXIT, err
    assert (log.read_text() if log.exists() else "") == ("requeue 42\n" if requeued else "")


def test_sigkill_to_launcher_leaves_no_rank(tmp_path):
    """SIGKILL cannot be forwarded; the ranks asked Linux for SIGTERM when their parent dies (PR_SET_PDEATHSIG), so
    they still save together and exit instead of training on as orphans."""
    run_dir = os.path.join(tmp_path, "tiny-cpu")
    code, _, err, ranks = signal_mid_run(["launch", "--nproc-per-node", "2", TINY, f"out_dir={tmp_path}", *FAST],
                                         run_dir, signal.SIGKILL, tmp_path)
    assert code == -signal.SIGKILL and len(ranks) == 2
    assert wait_gone(ranks, seconds=20.0) == [], err[-3000:]
    saved = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    assert saved is not None and 2 <= int(saved[-8:]) < 40
