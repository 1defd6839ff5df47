"""Damaged checkpoints: every checkpoint carries a manifest (size and SHA-256 of each file); a truncated, corrupted
or missing file is named in one line by `lsp eval` / `generate` / `export` (exit 2), and a resume falls back to the
newest intact checkpoint, setting the damaged one aside untouched. Before the manifest each of these was a 20-67-line
traceback from deep inside DCP or torch.load, and a resume never fell back.

Reference for "untouched": the damaged folder's bytes before and after (hashlib over every file). Negative controls:
an intact checkpoint passes, and one saved before manifests (none in its folder) still loads.
"""
import hashlib
import json
import os
import shutil
import subprocess

import pytest

from lsp.cli import main as lsp_main
from lsp.run_config import load_config
from lsp.train.manifest import MANIFEST, manifest_problem
from lsp.train.trainer import train

from .conftest import SMALL, TINY, run_lsp

STEPS = 4
ARGS = SMALL + ["parallel.sp=1", "name=m", f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with intact checkpoints at steps 2 and 4 (trained once; each test damages its own copy)."""
    out = tmp_path_factory.mktemp("manifest")
    train(load_config(TINY, ARGS + [f"out_dir={out}"]))
    return str(out)


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "out")
    return str(tmp_path / "out" / "m")


def step(run_dir, n):
    return os.path.join(run_dir, "checkpoints", f"step_{n:08d}")


def fingerprint(folder):
    # {relative path: sha256} of every file: what "untouched" is checked against
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def shard(folder):
    return next(name for name in sorted(os.listdir(folder)) if name.endswith(".distcp"))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_byte(path):
    # same size, one byte changed: only the checksum can tell
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


DAMAGE = {   # name -> (how, which file, the words the one line must contain)
    "truncated shard": (truncate, shard, "bytes, "),
    "corrupted shard": (flip_byte, shard, "has changed since it was saved"),
    "corrupted trainer.pt": (flip_byte, lambda _: "trainer.pt", "has changed since it was saved"),
    "missing config.yaml": (os.remove, lambda _: "config.yaml", "is missing"),
}


def damage(folder, kind):
    how, which, words = DAMAGE[kind]
    name = which(folder)
    how(os.path.join(folder, name))
    return name, words


def cli(capsys, *args):
    capsys.readouterr()
    rc = lsp_main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_manifest_records_every_file(run):
    folder = step(run, STEPS)
    with open(os.path.join(folder, MANIFEST)) as f:
        recorded = json.load(f)["files"]
    files = fingerprint(folder)
    del files[MANIFEST]
    assert {k: v["sha256"] for k, v in recorded.items()} == files
    assert all(v["size"] == os.path.getsize(os.path.join(folder, k)) for k, v in recorded.items())
    if shutil.which("sha256sum"):   # an independent reader of the same record
        lines = "".join(f"{v['sha256']}  {k}\n" for k, v in recorded.items())
        assert subprocess.run(["sha256sum", "-c", "--quiet", "-"], input=lines, text=True, cwd=folder).returncode == 0
    assert manifest_problem(folder) is None


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("command", ["eval", "generate", "export"])
def test_damaged_checkpoint_is_one_line(run, capsys, tmp_path, kind, command):
    folder = step(run, STEPS)
    name, words = damage(folder, kind)
    before = fingerprint(folder)
    args = {"eval": ["eval", run], "generate": ["generate", run, "--prompt", "1 2"],
            "export": ["export", run, str(tmp_path / "hf")]}[command]
    rc, _, err = cli(capsys, *args)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"checkpoint {folder} is damaged: {name}" in err and words in err
    assert f"the newest intact one is {step(run, 2)}" in err
    assert fingerprint(folder) == before   # nothing deleted or rewritten


def test_intact_and_pre_manifest_checkpoints_still_load(run, capsys):
    # controls: the intact run evaluates; without its manifest (a checkpoint saved before manifests) too, same loss
    rc, out, err = cli(capsys, "eval", run)
    assert rc == 0, err
    loss = json.loads(out.splitlines()[-1])["eval_loss"]
    for n in (2, 4):
        os.remove(os.path.join(step(run, n), MANIFEST))
    rc, out, err = cli(capsys, "eval", run)
    assert rc == 0 and json.loads(out.splitlines()[-1])["eval_loss"] == loss, err


@pytest.mark.parametrize("kind", ["truncated shard", "corrupted trainer.pt"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(run, capsys, monkeypatch, kind):
    folder = step(run, STEPS)
    name, words = damage(folder, kind)
    before, problem = fingerprint(folder), manifest_problem(folder)
    assert problem.startswith(name) and words in problem
    out_dir = os.path.dirname(run)
    monkeypatch.chdir(out_dir)
    rc, out, err = cli(capsys, "train", TINY, *ARGS, f"out_dir={out_dir}")
    assert rc == 0, err
    assert [line for line in out.splitlines() if "is damaged" in line] == [
        f"lsp: checkpoint {folder} is damaged: {problem}; moved it to {folder}.damaged, resuming from {step(run, 2)}"]
    assert f"resumed from {step(run, 2)} at step 2" in out
    assert fingerprint(folder + ".damaged") == before            # set aside, byte for byte
    assert manifest_problem(folder) is None and os.path.isfile(os.path.join(folder, "trainer.pt"))   # saved again


def test_resume_with_every_checkpoint_damaged_is_one_line(run, capsys, monkeypatch):
    for n in (2, 4):
        damage(step(run, n), "truncated shard")
    before = {n: fingerprint(step(run, n)) for n in (2, 4)}
    out_dir = os.path.dirname(run)
    monkeypatch.chdir(out_dir)
    rc, _, err = cli(capsys, "train", TINY, *ARGS, f"out_dir={out_dir}")
    assert rc == 2 and len(err.splitlines()) == 1 and "every checkpoint under" in err and "is damaged" in err
    assert {n: fingerprint(step(run, n)) for n in (2, 4)} == before


@pytest.mark.slow   # a 2-rank `lsp launch` (~30 s here); the single-process resume test above is the fast one
def test_two_rank_resume_falls_back(run):
    folder = step(run, STEPS)
    damage(folder, "truncated shard")
    proc = run_lsp("launch", "--nproc-per-node", "2", TINY, *ARGS, f"out_dir={os.path.dirname(run)}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("is damaged") == 1 and f"resumed from {step(run, 2)} at step 2" in proc.stdout
    assert os.path.isdir(folder + ".damaged") and manifest_problem(folder) is None
