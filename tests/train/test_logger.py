"""Run logging: the wandb run id lives in the run dir (a resumed job is one wandb run); a progress bar only on a
terminal, one plain line per logged row otherwise, eval results shown in the bar."""
import io
import itertools
import json
import re
import sys
import types
from datetime import datetime, timedelta, timezone

import pytest

from lsp.run_config import load_config
from lsp.train.logger import RunLogger

from .conftest import SMALL, TINY


class FakeWandb(types.ModuleType):
    """Records wandb.init's arguments (no wandb process, no files)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.events = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        self.events.append("init")
        return types.SimpleNamespace(log=lambda *a, **k: None,
                                     finish=lambda exit_code=0: self.events.append(f"finish {exit_code}"))


def make_logger(tmp_path, name="r", *extra, start=0):
    cfg = load_config(None, [*SMALL, f"out_dir={tmp_path}", f"name={name}", "logging.plot=false", *extra])
    return RunLogger(cfg, True, total_steps=10, start_step=start)


def test_wandb_run_id_is_kept_in_the_run_dir(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for start in (0, 4):   # the first run, then its resume
        make_logger(tmp_path, "r", "logging.wandb=true", start=start).close()
    make_logger(tmp_path, "other", "logging.wandb=true").close()
    ids = [i["id"] for i in fake.inits]
    assert ids[0] == ids[1] and all(i["resume"] == "allow" for i in fake.inits)     # one wandb run for the job
    assert ids[2] != ids[0]                                                        # control: another run dir
    assert (tmp_path / "r" / "wandb_id").read_text().strip() == ids[0]


def test_a_failing_run_finishes_wandb_before_its_error(tmp_path, monkeypatch):
    """wandb's closing lines came after the traceback (its atexit hook ran last); now a run that fails finishes
    wandb (exit code 1) before the exception leaves the trainer, so the error is the last thing printed."""
    from lsp.cli import main as lsp_main
    from lsp.train.trainer import Trainer
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    real_step = Trainer.train_step

    def step_then_fail(self):
        if self.step == 1:
            fake.events.append("error")
            raise RuntimeError("boom at step 2")
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_then_fail)
    args = ["train", TINY, f"out_dir={tmp_path}", "name=f", *SMALL, "parallel.sp=1", "train.steps=3",
            "logging.wandb=true"]
    with pytest.raises(RuntimeError, match="boom at step 2"):
        lsp_main(args)
    assert fake.events == ["init", "error", "finish 1"]   # before: ["init", "error"], wandb closed at exit
    monkeypatch.setattr(Trainer, "train_step", real_step)
    fake.events.clear()
    assert lsp_main([*args, "name=ok"]) == 0
    assert fake.events == ["init", "finish 0"]   # control: a run that ends well finishes with 0


def test_real_offline_wandb_resumes_the_same_run(tmp_path):
    """With the real wandb package (offline, no network): the first run and its resume write two offline runs with
    the one id of RUN_DIR/wandb_id (`wandb sync` merges them into one run)."""
    pytest.importorskip("wandb")
    for start in (0, 4):
        logger = make_logger(tmp_path, "r", "logging.wandb=true", "logging.wandb_mode=offline", start=start)
        assert logger.wandb is not None
        logger.log({"step": start + 1, "loss": 1.0})
        logger.close()
    run_id = (tmp_path / "r" / "wandb_id").read_text().strip()
    runs = sorted(p.name for p in (tmp_path / "r" / "wandb").glob("offline-run-*"))
    # two folders; when both start within the same second (the name has the time to the second) wandb gives the
    # second folder a "-1" suffix: the id is the same either way
    assert runs and all(re.search(f"-{run_id}(-\\d+)?$", name) for name in runs), runs


class Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


ROWS = [{"step": 2, "loss": 4.25, "tokens_per_s": 1000.0}, {"step": 2, "eval_loss": 4.5, "eval_accuracy": 0.125},
        {"step": 4, "loss": 4.0, "tokens_per_s": 1100.0}]


@pytest.mark.parametrize("tty", [False, True], ids=["log-file", "terminal"])
def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, tty):
    stream = Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    ticks = itertools.count(0, 10)   # the logger's clock: 0 s at the start, then +10 s per row
    monkeypatch.setattr("lsp.train.logger.time.monotonic", lambda: next(ticks))
    logger = make_logger(tmp_path, "r", "logging.tqdm=true")
    for row in ROWS:
        logger.log(row)
        logger.advance(2)
    logger.close()
    text = stream.getvalue()
    if tty:
        assert "\r" in text and "eval_acc=0.1250" in text and "loss=4.0000" in text.split("\r")[-1]
    else:
        assert "\r" not in text
        # 10 steps: 2 done after 10 s -> 8 left at 5 s each; an ETA, and time / elapsed_s in every JSONL row
        assert text.splitlines() == ["step=2 loss=4.25 tokens_per_s=1000 elapsed=10s eta=40s",
                                     "step=2 eval_loss=4.5 eval_accuracy=0.125 elapsed=20s eta=1m20s",
                                     "step=4 loss=4 tokens_per_s=1100 elapsed=30s eta=45s"]
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["elapsed_s"] for r in rows] == [10, 20, 30]
    assert all(abs(datetime.fromisoformat(r["time"]) - datetime.now(timezone.utc)) < timedelta(minutes=5)
               for r in rows)
    assert [{k: v for k, v in r.items() if k not in ("time", "elapsed_s")} for r in rows] == ROWS


def test_duration_format():
    from lsp.train.logger import duration
    assert [duration(s) for s in (0.4, 59.6, 184, 7500)] == ["0s", "1m00s", "3m04s", "2h05m"]
