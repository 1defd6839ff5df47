"""The validation split of a run.

- A run whose validation split rounds to zero windows (data.val_fraction=0, or the default 0.05 of a corpus of fewer
  than 20 windows) trains without evaluation, says so in one line at its start, and saves its checkpoint; `lsp eval`
  of it is one line, exit 2 (it used to train, then crash with an IndexError at the first evaluation, saving nothing).
- The eval set is data.eval_batches batches whatever the dp size, so the logged eval loss of a dp=2 run equals that
  of the same run at dp=1 and `lsp eval`'s (the set used to grow with dp).
- A run's saved config names its data by absolute paths: `lsp eval` works from another directory.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from lsp.cli import main as lsp_main
from lsp.run_config import load_config
from lsp.train.data import DataLoader

from .conftest import SMALL, TINY

STEPS = 4
NO_EVAL = "leaves no validation window: training without evaluation"


def write_corpus(path, windows, seq_len=32):
    # windows * seq_len + 1 byte tokens (the document's eos included): exactly `windows` windows
    path.write_text("".join(chr(97 + i % 26) for i in range(windows * seq_len)))
    return str(path)


def lsp(*args, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lsp.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def train(tmp, capsys, monkeypatch, *args, launch=None, cwd=None):
    """`lsp train` in this process (torch is imported already: seconds saved per run), or `lsp launch` with
    `launch` ranks in a subprocess; run from cwd (default tmp) -> stdout."""
    if launch is not None:
        proc = lsp("launch", "--nproc-per-node", str(launch), TINY, *args, cwd=str(cwd or tmp))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout
    monkeypatch.chdir(cwd or tmp)
    capsys.readouterr()
    rc = lsp_main(["train", TINY, *args])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    return out


def train_files(tmp, capsys, monkeypatch, corpus, *extra, launch=None):
    out = train(tmp, capsys, monkeypatch, *SMALL, f"out_dir={tmp}", "name=r", "parallel.sp=1", "data.kind=files",
                f"data.files=[{corpus}]", f"data.cache_dir={tmp}/cache", "train.micro_batch=1",
                f"train.steps={STEPS}", "train.eval_every=2", *extra, launch=launch)
    return out, os.path.join(tmp, "r")


def eval_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "eval_loss" in row]


def eval_cli(capsys, *args):
    capsys.readouterr()
    rc = lsp_main(["eval", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_trains_without_evaluation(out, run_dir, capsys):
    assert len([line for line in out.splitlines() if NO_EVAL in line]) == 1
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", f"step_{STEPS:08d}", "trainer.pt"))
    assert eval_rows(run_dir) == [] and "final " in out
    rc, _, err = eval_cli(capsys, run_dir)
    assert rc == 2 and len(err.splitlines()) == 1 and "the run has no validation windows" in err


CASES = {"val_fraction=0": (40, ["data.val_fraction=0"]), "tiny corpus": (10, [])}   # 0.05 * 10 windows -> 0


@pytest.mark.parametrize("case", CASES)
def test_no_validation_windows_trains_and_saves(tmp_path, capsys, monkeypatch, case):
    windows, extra = CASES[case]
    corpus = write_corpus(tmp_path / "corpus.txt", windows)
    out, run_dir = train_files(tmp_path, capsys, monkeypatch, corpus, *extra)
    assert_trains_without_evaluation(out, run_dir, capsys)


@pytest.mark.slow   # two `lsp launch` runs of 2 ranks, ~30 s each here; the single-process test above is the fast one
@pytest.mark.parametrize("case", CASES)
def test_no_validation_windows_two_ranks(tmp_path, capsys, monkeypatch, case):
    windows, extra = CASES[case]
    corpus = write_corpus(tmp_path / "corpus.txt", windows)
    out, run_dir = train_files(tmp_path, capsys, monkeypatch, corpus, *extra, launch=2)
    assert_trains_without_evaluation(out, run_dir, capsys)


def test_a_corpus_with_validation_windows_still_evaluates(tmp_path, capsys, monkeypatch):
    # control for the two tests above: 20 windows at the default 0.05 keep one validation window
    corpus = write_corpus(tmp_path / "corpus.txt", 20)
    out, run_dir = train_files(tmp_path, capsys, monkeypatch, corpus)
    assert NO_EVAL not in out and [row["step"] for row in eval_rows(run_dir)] == [2, 4]


@pytest.mark.parametrize("kind", ["mqar", "files"])
def test_eval_set_is_the_same_at_every_dp_size(tmp_path, kind):
    data = [] if kind == "mqar" else ["data.kind=files", f"data.files=[{write_corpus(tmp_path / 'c.txt', 60)}]",
                                      f"data.cache_dir={tmp_path}/cache", "data.val_fraction=0.2"]
    cfg = load_config(None, SMALL + data + ["data.eval_batches=5", "train.micro_batch=2"])

    def global_set(dp):
        # (batch index, input ids) of the counted batches of all dp ranks; every rank runs as many forwards
        slots = [DataLoader(cfg, dp_rank=r, dp_size=dp).eval_batches() for r in range(dp)]
        assert len({len(s) for s in slots}) == 1
        counted = {i * dp + r: b.input_ids for r, s in enumerate(slots) for i, (b, counts) in enumerate(s) if counts}
        return [counted[k] for k in sorted(counted)]

    one = global_set(1)
    assert len(one) == 5 and not torch.equal(one[0], one[1])   # distinct batches: the comparison below can fail
    for dp in (2, 3):
        got = global_set(dp)
        assert len(got) == 5 and all(torch.equal(a, b) for a, b in zip(got, one))


@pytest.mark.slow   # a 2-rank `lsp launch` (~30 s here); test_eval_set_is_the_same_at_every_dp_size is the fast one
def test_dp2_eval_loss_equals_dp1_and_lsp_eval(tmp_path, capsys, monkeypatch):
    # the same global batch (dp x micro_batch x grad_accum = 4) at dp=2 and dp=1: the same data, weights equal up
    # to fp32 rounding of the gradient sums; before the fix the dp=2 eval set had twice the batches (0.3% apart)
    base = [*SMALL, f"out_dir={tmp_path}", "parallel.sp=1", "train.micro_batch=2", f"train.steps={STEPS}"]
    train(tmp_path, capsys, monkeypatch, *base, "name=dp2", launch=2)
    train(tmp_path, capsys, monkeypatch, *base, "name=dp1", "train.grad_accum=2")
    dp2, dp1 = str(tmp_path / "dp2"), str(tmp_path / "dp1")
    logged2, logged1 = eval_rows(dp2)[-1]["eval_loss"], eval_rows(dp1)[-1]["eval_loss"]
    assert logged2 == pytest.approx(logged1, rel=2e-5)
    rc, out, _ = eval_cli(capsys, dp2)
    assert rc == 0 and json.loads(out.splitlines()[-1])["eval_loss"] == pytest.approx(logged2, rel=1e-6)


def test_eval_from_another_directory_with_relative_data_files(tmp_path, capsys, monkeypatch):
    origin, elsewhere = tmp_path / "origin", tmp_path / "elsewhere"
    origin.mkdir(), elsewhere.mkdir()
    write_corpus(origin / "corpus.txt", 40)
    train(tmp_path, capsys, monkeypatch, *SMALL, "out_dir=runs", "name=rel", "parallel.sp=1", "data.kind=files",
          "data.files=[corpus.txt]", "data.cache_dir=cache", "data.val_fraction=0.1", "train.micro_batch=1",
          f"train.steps={STEPS}", cwd=origin)
    run_dir = str(origin / "runs" / "rel")
    saved = load_config(os.path.join(run_dir, "checkpoints", f"step_{STEPS:08d}", "config.yaml"), check_files=False)
    assert saved.data.files == [str(origin / "corpus.txt")] and saved.data.cache_dir == str(origin / "cache")
    monkeypatch.chdir(elsewhere)
    rc, out, err = eval_cli(capsys, run_dir)
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1])["eval_loss"] == pytest.approx(eval_rows(run_dir)[-1]["eval_loss"],
                                                                          rel=1e-6)
    assert os.listdir(elsewhere) == []   # the run's token cache was reused, nothing written here


def test_saved_config_paths_are_absolute(tmp_path, monkeypatch):
    # relative paths resolve against the directory the run started in; names that are not paths stay as they are
    from lsp.run_config import with_absolute_paths
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds").mkdir()
    cfg = load_config(None, ["data.files=[a.txt]", "data.cache_dir=c", "data.tokenizer=tok.json", "init_from=prev",
                             "data.hf.path=ds", "data.hf.data_files=[x.jsonl]"], check_files=False)
    (tmp_path / "x.jsonl").write_text("")
    out = with_absolute_paths(cfg)
    assert (out.data.files, out.data.cache_dir, out.data.tokenizer, out.init_from, out.data.hf.path) == (
        [str(tmp_path / "a.txt")], str(tmp_path / "c"), str(tmp_path / "tok.json"), str(tmp_path / "prev"),
        str(tmp_path / "ds"))
    assert out.data.hf.data_files == [str(tmp_path / "x.jsonl")] and cfg.data.files == ["a.txt"]   # cfg untouched
    byte = with_absolute_paths(load_config(None, ["data.hf.path=json", "data.hf.data_files=[nowhere.jsonl]"]))
    assert (byte.data.tokenizer, byte.init_from, byte.data.hf.path, byte.data.hf.data_files) == (
        "byte", "", "json", ["nowhere.jsonl"])
