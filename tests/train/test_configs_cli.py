"""Shipped configs validate at the world size of the launch command in their header; the torchrun command line."""
import argparse
import glob
import os
import re
import subprocess

import pytest

from lsp.cli import UserError, build_parser, torchrun_command
from lsp.run_config import ConfigError, load_config, validate

from .conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_header_command_is_valid(path):
    with open(path) as f:
        header = "".join(line for line in f if line.startswith("#"))
    assert "lsp launch" in header, "every config documents its exact launch command"
    nproc = int(re.search(r"--nproc-per-node (\d+)", header).group(1))
    nnodes = int(m.group(1)) if (m := re.search(r"--nnodes (\d+)", header)) else 1
    cfg = load_config(path, ["data.kind=mqar"])   # the GPU configs read data.files given on the command line
    validate(cfg, world_size=nproc * nnodes)
    with pytest.raises(ConfigError):               # control: a world size that does not fit is rejected
        validate(cfg, world_size=nproc * nnodes * cfg.parallel.sp + 1)


def test_torchrun_command():
    args = build_parser().parse_args(["launch", "--nproc-per-node", "2", "c.yaml", "train.steps=3"])
    cmd = torchrun_command(args)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd and "--nproc-per-node=2" in cmd
    assert cmd[-5:] == ["-m", "lsp.cli", "train", "c.yaml", "train.steps=3"]
    args = build_parser().parse_args(["launch", "--nnodes", "4", "--nproc-per-node", "8", "--node-rank", "2",
                                      "--rdzv-endpoint", "h:29500", "--max-restarts", "3", "c.yaml"])
    cmd = torchrun_command(args)
    assert {"--nnodes=4", "--node-rank=2", "--rdzv-endpoint=h:29500", "--rdzv-backend=c10d",
            "--max-restarts=3"} <= set(cmd) and "--standalone" not in cmd
    with pytest.raises(UserError, match="--rdzv-endpoint"):
        torchrun_command(argparse.Namespace(**{**vars(args), "rdzv_endpoint": ""}))


def test_launch_scripts_parse():
    for script in ("torchrun.sh", "slurm.sbatch"):
        subprocess.run(["bash", "-n", os.path.join(REPO, "launch", script)], check=True)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_header_one_process_command_has_its_own_run_dir(path):
    """A documented `lsp train` variant must not land in the launch command's run dir (it would find that run's
    checkpoints and only evaluate them)."""
    with open(path) as f:
        header = "".join(line for line in f if line.startswith("#"))
    cfg = load_config(path, ["data.kind=mqar"])
    for command in re.findall(r"lsp train \S+ (.*)", header):
        names = re.findall(r"\bname=(\S+)", command)
        assert names and names[-1] != cfg.name, command


def test_cache_dir_is_git_ignored():
    assert subprocess.run(["git", "check-ignore", "-q", ".cache/lsp-data/x.tokens"], cwd=REPO).returncode == 0
    assert subprocess.run(["git", "check-ignore", "-q", "lsp/cli.py"], cwd=REPO).returncode == 1     # control
