"""Fault injection for the reliability tests (docs/reliability.md). Inert unless one of these is set:

    LSP_TEST_NONFINITE_AT=RANK:STEP   multiply that rank's loss by NaN in step STEP (1-based, as in metrics.jsonl)
    LSP_TEST_KILL_AT_STEP=RANK:STEP   os._exit(1) that rank after step STEP (1-based) is done and saved, once: a
                                      marker file in the run dir keeps a torchrun restart from dying again
    LSP_TEST_STEP_SLEEP=SECONDS       sleep after every step, so a test's signal lands in the middle of a run
    LSP_TEST_CKPT_SLEEP=STEP:SECONDS  sleep inside the write of checkpoint STEP, after the DCP shards and before
                                      trainer.pt (prints "lsp-test: checkpoint write paused"), for a SIGKILL
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, Tuple


def _pair(name: str) -> Optional[Tuple[int, float]]:
    value = os.environ.get(name)
    if not value:
        return None
    a, b = value.split(":")
    return int(a), float(b)


def poison_loss(loss, rank: int, step: int):
    # loss: [] -> the same, NaN at the chosen rank and step
    hook = _pair("LSP_TEST_NONFINITE_AT")
    if hook is not None and hook == (rank, step):
        return loss * float("nan")
    return loss


def maybe_kill(rank: int, step: int, run_dir: str) -> None:
    hook = _pair("LSP_TEST_KILL_AT_STEP")
    if hook is None or hook != (rank, step):
        return
    os.makedirs(run_dir, exist_ok=True)
    marker = os.path.join(run_dir, f".lsp-test-killed-{rank}-{step}")
    if os.path.exists(marker):
        return
    with open(marker, "w"):
        pass
    print(f"lsp-test: rank {rank} dies after step {step}", file=sys.stderr, flush=True)
    os._exit(1)


def maybe_pause_checkpoint(step: int) -> None:
    hook = _pair("LSP_TEST_CKPT_SLEEP")
    if hook is not None and int(hook[0]) == step:
        print("lsp-test: checkpoint write paused", flush=True)
        time.sleep(hook[1])


def maybe_slow_step() -> None:
    seconds = os.environ.get("LSP_TEST_STEP_SLEEP")
    if seconds:
        time.sleep(float(seconds))
