"""`accelerate launch -m lsp.cli train`: its flags reach the ranks as ACCELERATE_* variables and are honoured through
the lsp config or refused with one line naming the key (the table below), never silently ignored; real launches
with 2 gloo ranks for both outcomes."""
import os
import shutil
import subprocess
import sys

import pytest

from lsp.run_config import ConfigError, load_config
from lsp.train.accelerate_env import apply_accelerate_env

from .conftest import REPO, TINY

# (environment set by accelerate launch, lsp overrides, expected (precision, device, engine) or error text)
CASES = [
    ({}, [], ("auto", "auto", "ddp")),                                           # not under accelerate
    ({"ACCELERATE_MIXED_PRECISION": "no"}, [], ("auto", "auto", "ddp")),          # accelerate's default
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, [], ("bf16", "auto", "ddp")),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, ["train.precision=bf16"], ("bf16", "auto", "ddp")),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, ["train.precision=fp32"], "train.precision: fp32 conflicts with"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, [], "train.precision: accelerate launch --mixed_precision fp16 is not"),
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, [], "--mixed_precision fp8 is not supported"),
    ({"ACCELERATE_USE_CPU": "True"}, [], ("auto", "cpu", "ddp")),
    ({"ACCELERATE_USE_CPU": "True"}, ["train.device=cuda"], "train.device: cuda conflicts with accelerate launch"),
    ({"ACCELERATE_USE_FSDP": "true"}, [], "parallel.engine: ddp conflicts with accelerate launch --use_fsdp"),
    ({"ACCELERATE_USE_FSDP": "true"}, ["parallel.engine=fsdp", "parallel.zero=3"], ("auto", "auto", "fsdp")),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "parallel.engine: ddp conflicts with accelerate launch --use_deepspeed"),
    ({"ACCELERATE_USE_MEGATRON_LM": "true"}, [], "--use_megatron_lm is not supported"),
    ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, [], "train: accelerate launch --dynamo_backend INDUCTOR"),
    ({"ACCELERATE_DYNAMO_BACKEND": "NO"}, [], ("auto", "auto", "ddp")),
]


@pytest.mark.parametrize("env,overrides,expected", CASES)
def test_accelerate_flags_honoured_or_refused(env, overrides, expected):
    cfg = load_config(TINY, overrides)
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("|", r"\|")):
            apply_accelerate_env(cfg, env)
        return
    apply_accelerate_env(cfg, env)
    assert (cfg.train.precision, cfg.train.device, cfg.parallel.engine) == expected


def accelerate(*args, timeout=180):
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if exe is None:
        pytest.skip("accelerate is not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--dynamo_backend", "no", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def test_accelerate_launch_fp16_is_refused_once(tmp_path):
    proc = accelerate("--mixed_precision", "fp16", "-m", "lsp.cli", "train", TINY, f"out_dir={tmp_path}",
                      "train.steps=2", "logging.wandb=false")
    assert proc.returncode != 0
    line = ("config error: train.precision: accelerate launch --mixed_precision fp16 is not supported: lsp trains "
            "in bf16 (--mixed_precision bf16 or train.precision=bf16) or fp32")
    assert proc.stderr.count("config error:") == 1 and line in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "tiny-cpu")


@pytest.mark.slow
def test_accelerate_launch_bf16_is_honoured(tmp_path):
    proc = accelerate("--mixed_precision", "bf16", "-m", "lsp.cli", "train", TINY, f"out_dir={tmp_path}",
                      "train.steps=2", "logging.wandb=false", "logging.tqdm=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dp=1 sp=2 engine=ddp device=cpu precision=bf16" in proc.stdout
