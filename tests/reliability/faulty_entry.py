"""`python -m tests.reliability.faulty_entry ARGS` = `lsp ARGS` with faults injected (tests only, docs/reliability.md).

The production code reads no test switches: this entry wraps its seams (`Trainer.micro_loss`, `Trainer.train_step`,
`lsp.train.checkpoint._write_trainer_state`) from these variables, then runs `lsp.cli.main`. Under `launch` the
ranks run this module too (torchrun's worker command is rewritten), and they inherit the variables.

    LSP_TEST_NONFINITE_AT=RANK:STEP   that rank's loss is multiplied by NaN in step STEP (1-based, as in metrics.jsonl)
    LSP_TEST_KILL_AT_STEP=RANK:STEP   os._exit(1) on that rank once step STEP is done (logged, saved): when step
                                      STEP+1 starts; a marker file in the run dir makes it happen once, so the
                                      torchrun restart does not die again
    LSP_TEST_STEP_SLEEP=SECONDS       sleep before every step, so a test's signal lands in the middle of a run
    LSP_TEST_CKPT_SLEEP=STEP:SECONDS  pause the write of checkpoint STEP after the DCP shards and RNG files, before
                                      trainer.pt (prints "lsp-test: checkpoint write paused"), for a SIGKILL
"""
from __future__ import annotations

import functools
import os
import sys
import time
from typing import List, Optional, Tuple

MODULE = "tests.reliability.faulty_entry"


def _pair(name: str) -> Optional[Tuple[int, float]]:
    value = os.environ.get(name)
    if not value:
        return None
    a, b = value.split(":")
    return int(a), float(b)


def worker_command(cmd: List[str]) -> List[str]:
    """A torchrun command line (lsp.cli.torchrun_command) whose ranks run this module instead of lsp.cli."""
    i = cmd.index("lsp.cli")
    assert cmd[i - 1] == "-m", cmd
    return [*cmd[:i], MODULE, *cmd[i + 1:]]


def _die_once(trainer, rank: int, step: int) -> None:
    marker = os.path.join(trainer.cfg.run_dir, f".lsp-test-killed-{rank}-{step}")
    if os.path.exists(marker):
        return
    os.makedirs(trainer.cfg.run_dir, exist_ok=True)
    open(marker, "w").close()
    print(f"lsp-test: rank {rank} dies after step {step}", file=sys.stderr, flush=True)
    os._exit(1)


def install() -> None:
    """Wrap the seams for the variables that are set; nothing is wrapped without them."""
    import lsp.cli
    from lsp.train import checkpoint
    from lsp.train.trainer import Trainer

    lsp.cli.torchrun_command = _wrap_result(lsp.cli.torchrun_command, worker_command)
    if (nonfinite := _pair("LSP_TEST_NONFINITE_AT")) is not None:
        Trainer.micro_loss = _poisoned(Trainer.micro_loss, nonfinite)
    kill, sleep = _pair("LSP_TEST_KILL_AT_STEP"), float(os.environ.get("LSP_TEST_STEP_SLEEP") or 0)
    if kill is not None or sleep:
        Trainer.train_step = _before_step(Trainer.train_step, kill, sleep)
    if (pause := _pair("LSP_TEST_CKPT_SLEEP")) is not None:
        checkpoint._write_trainer_state = _paused(checkpoint._write_trainer_state, pause)


def _wrap_result(fn, post):
    return functools.wraps(fn)(lambda *args, **kwargs: post(fn(*args, **kwargs)))


def _poisoned(micro_loss, at):
    @functools.wraps(micro_loss)
    def wrapper(self, *args, **kwargs):
        loss = micro_loss(self, *args, **kwargs)
        return loss * float("nan") if (self.mesh.rank, self.step + 1) == at else loss
    return wrapper


def _before_step(train_step, kill, sleep):
    @functools.wraps(train_step)
    def wrapper(self):
        if kill is not None and (self.mesh.rank, self.step) == kill:   # self.step steps are done
            _die_once(self, self.mesh.rank, self.step)
        time.sleep(sleep)
        return train_step(self)
    return wrapper


def _paused(write, at):
    @functools.wraps(write)
    def wrapper(tmp, trainer_state, config_yaml):
        if trainer_state["step"] == at[0]:
            print("lsp-test: checkpoint write paused", flush=True)
            time.sleep(at[1])
        return write(tmp, trainer_state, config_yaml)
    return wrapper


if __name__ == "__main__":
    install()
    from lsp.cli import main
    sys.exit(main())
