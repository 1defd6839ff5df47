"""What a run directory holds, readable without torch (so `lsp eval` / `lsp launch` answer before importing it).

    <out_dir>/<name>/                run dir
        checkpoints/step_00000100/   complete checkpoint (trainer.pt + DCP .metadata, or deepspeed/; manifest.json)
        checkpoints/step_00000200.damaged/   a checkpoint that failed its manifest, set aside by a resume
        checkpoints/latest           one line, the name of the newest complete checkpoint
        wandb_id                     the wandb run id, so a resumed job logs into the same wandb run
"""
from __future__ import annotations

import os
import re
import secrets
from typing import List, Optional, Tuple

from lsp.run_config import ConfigError

from .files import write_text_atomic
from .manifest import manifest_problem

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


def complete_checkpoints(root: str) -> List[str]:
    """The complete step_N folders under root, newest first."""
    if not os.path.isdir(root):
        return []
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := STEP_DIR.match(name)))
    return [os.path.join(root, name) for _, name in reversed(steps) if is_complete(os.path.join(root, name))]


def require_intact(path: str) -> None:
    """ValueError (one line) when the checkpoint at path does not match its manifest, naming it, the damaged file
    and the newest intact checkpoint beside it (what `lsp eval` / `generate` / `export` can be given instead)."""
    problem = manifest_problem(path)
    if problem is None:
        return
    intact = next((p for p in complete_checkpoints(os.path.dirname(path)) if manifest_problem(p) is None), None)
    hint = f"; the newest intact one is {intact}" if intact else "; no intact checkpoint is beside it"
    raise ValueError(f"checkpoint {path} is damaged: {problem}{hint}")


def set_aside_damaged(root: str) -> Tuple[Optional[str], List[str]]:
    """What a resume starts from: (the newest complete checkpoint under root that matches its manifest, one line for
    each newer damaged one). Each damaged one is renamed to `step_N.damaged` (never deleted or overwritten: kept
    for inspection, and out of the way of the step that training will save again) and `latest` names the intact one.
    ValueError when checkpoints exist and every one is damaged (nothing is renamed then)."""
    damaged = []
    for path in complete_checkpoints(root):
        problem = manifest_problem(path)
        if problem is None:
            break
        damaged.append((path, problem))
    else:
        if damaged:
            raise ValueError(f"every checkpoint under {root} is damaged (the newest, {damaged[0][0]}: "
                             f"{damaged[0][1]}); move them away to start over, or choose another name=")
        return None, []
    notes = []
    for bad, problem in damaged:
        aside = _free_name(bad + ".damaged")
        os.rename(bad, aside)
        notes.append(f"lsp: checkpoint {bad} is damaged: {problem}; moved it to {aside}, resuming from {path}")
    if damaged:
        write_text_atomic(os.path.join(root, "latest"), os.path.basename(path) + "\n", sync=True)
    return path, notes


def _free_name(path: str) -> str:
    # path, else path.1, path.2, ...: a name that nothing holds yet
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


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
