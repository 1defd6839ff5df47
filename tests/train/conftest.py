import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny-cpu.yaml")

# a model and task small enough for a few-second CPU run
SMALL = ["model.hidden_size=32", "data.seq_len=32", "data.mqar.num_kv_pairs=4", "data.mqar.num_queries=4",
         "train.micro_batch=4", "train.log_every=1", "train.eval_every=0", "data.eval_batches=2",
         "optim.warmup_steps=2", "logging.wandb=false", "logging.tqdm=false", "logging.plot=false"]


def run_lsp(*args, timeout=300, env_extra=None):
    """`lsp ...` in a subprocess (the console entry point's module), returns CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "lsp.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
