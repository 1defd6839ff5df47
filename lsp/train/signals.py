"""Save on signal: SIGTERM / SIGINT / SIGUSR1 (`checkpoint.save_on_signals`) ask a run to stop cleanly.

A handler only records the signal; the trainer reads the record once per step inside the all-reduce it already does
for the non-finite check, so every rank learns "some rank was signalled" in the same step without an extra
collective, finishes that step, writes a complete checkpoint and exits with `STOPPED_EXIT` (75, EX_TEMPFAIL: "try
again later"). Re-running the same command resumes from that checkpoint. torchrun (and `lsp launch`, which runs it
in-process) forwards SIGTERM / SIGINT / SIGHUP / SIGQUIT, plus the signals named here, to every rank and waits
`checkpoint.save_timeout_s` before it kills them.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Dict, List

STOPPED_EXIT = 75
TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")     # torchrun's own default list


class StopRequested(RuntimeError):
    """Raised by `Trainer.fit` after the checkpoint of a signalled run is written; str() is one line."""


class StopSignals:
    """Context manager: while active, the named signals set `received` (a signal number) instead of killing."""

    def __init__(self, names: List[str]):
        self.numbers = [getattr(signal, name) for name in names]
        self.received = 0
        self._previous: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum   # the first one names the stop; repeats (torchrun forwards) are no-ops

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():   # Python handles signals there only
            return self
        for number in self.numbers:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def signal_name(number: int) -> str:
    return signal.Signals(number).name


def torchrun_signals(names: List[str]) -> str:
    """The `--signals-to-handle` list for torchrun: its defaults plus the configured save signals."""
    return ",".join(dict.fromkeys([*TORCHRUN_SIGNALS, *names]))


def die_with_launcher() -> None:
    """Under torchrun: ask Linux for SIGTERM when the agent dies (even by SIGKILL, which it cannot forward), so the
    ranks save and stop instead of training on as orphans. The agent starts ranks from its main thread, which lives
    as long as the agent does. No-op off Linux."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
