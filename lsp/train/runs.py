"""What a run directory holds, readable without torch (so `lsp eval` / `lsp launch` answer before importing it).

    <out_dir>/<name>/                run dir
        checkpoints/step_00000100/   complete checkpoint (trainer.pt + DCP .metadata, or deepspeed/)
        checkpoints/latest           one line, the name of the newest complete checkpoint
        wandb_id                     the wandb run id, so a resumed job logs into the same wandb run
"""
from __future__ import annotations

import os
import re
import secrets
from typing import Optional

from lsp.run_config import ConfigError

from .files import write_text_atomic

STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "trainer.pt")) and (
        os.path.isfile(os.path.join(path, ".metadata")) or os.path.isdir(os.path.join(path, "deepspeed")))


def latest_checkpoint(root: str) -> Optional[str]:
    """Path of the newest complete checkpoint under root (via `latest`, else by scanning), or None."""
    if not os.path.isdir(root):
        return None
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if is_complete(path):
            return path
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := STEP_DIR.match(name)))
    for _, name in reversed(steps):
        if is_complete(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def find_checkpoint(path: str) -> Optional[str]:
    """A checkpoint dir itself, else the newest complete one under it or under its `checkpoints/` (a run dir)."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        if is_complete(candidate):
            return candidate
        found = latest_checkpoint(candidate)
        if found:
            return found
    return None


def wandb_run_id(run_dir: str) -> str:
    """The wandb run id kept in `<run_dir>/wandb_id`: made once (8 random hex digits, a valid wandb id), read back by
    every resume, so one job that is stopped and restarted is one wandb run (wandb.init(id=..., resume="allow"))."""
    path = os.path.join(run_dir, "wandb_id")
    if os.path.isfile(path):
        with open(path) as f:
            if (saved := f.read().strip()):
                return saved
    new_id = secrets.token_hex(4)
    make_run_dir(run_dir)
    write_text_atomic(path, new_id + "\n")
    return new_id


def make_run_dir(run_dir: str) -> None:
    """Create the run directory, or one line naming out_dir (ConfigError) when the system refuses: what
    lsp.run_config.dir_problem cannot see beforehand (root on a read-only or virtual file system)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as err:
        raise ConfigError("out_dir", f"cannot create {run_dir}: {err.strerror}") from None
