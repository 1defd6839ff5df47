"""`lsp launch`: torchrun's elastic agent, run inside the `lsp` process itself.

In-process (not a child `torchrun`), so a signal sent to the `lsp launch` PID (Ctrl-C, `kill`, Slurm) reaches the
agent, which forwards it to every rank and waits `checkpoint.save_timeout_s` for them to save and exit
(lsp/train/signals.py) before it kills them: no rank outlives the launcher. The agent's own multi-line reports are
replaced by one line; a rank's user error (exit 2), non-finite stop (3) or save-on-signal stop (75) is passed on as
the launcher's exit code, after the rank has said why (rank 0 prints it once).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import List

from .signals import STOPPED_EXIT, signal_name

PASS_THROUGH = (2, 3, STOPPED_EXIT)   # exit codes whose reason the ranks print themselves


def _quiet_agent() -> None:
    """The agent logs every worker exit and restart at WARNING/ERROR over many lines; lsp says it in one.
    LOGLEVEL=INFO (torchrun's own switch) brings them back."""
    if os.environ.get("LOGLEVEL"):
        return
    for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run"):
        logger = logging.getLogger(name)
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


def failure_exit(failures: dict) -> tuple[int, str]:
    """(exit code, message or "") for the ranks' failures {global rank: ProcessFailure}. Rank 0 prints the reason
    of the exit codes in PASS_THROUGH itself (the other ranks wait for it: lsp/cli.py), so those pass on silently."""
    rank0 = failures.get(0)
    if rank0 is not None and rank0.exitcode in PASS_THROUGH:
        return rank0.exitcode, ""
    rank, failure = min(failures.items(), key=lambda item: item[1].timestamp)
    how = f"signal {signal_name(-failure.exitcode)}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    code = failure.exitcode if failure.exitcode in PASS_THROUGH else 1
    return code, f"rank {rank} failed first ({how}); its error is above"


def run_agent(torchrun_args: List[str], checkpoint_dir: str) -> int:
    """Run torchrun (`python -m torch.distributed.run` arguments, without the `-m ...` prefix) in this process."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from .runs import latest_checkpoint
    _quiet_agent()
    try:
        run(parse_args(torchrun_args))
        return 0
    except SignalException as err:
        latest = latest_checkpoint(checkpoint_dir) or "none"
        print(f"lsp launch: {signal_name(err.sigval)}: the ranks were stopped; last complete checkpoint: {latest}; "
              "run the same command again to resume", file=sys.stderr, flush=True)
        return STOPPED_EXIT
    except ChildFailedError as err:
        code, message = failure_exit(err.failures)
        if message:
            print(f"lsp launch: {message}", file=sys.stderr, flush=True)
        return code
