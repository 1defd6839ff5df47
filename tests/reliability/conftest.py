import glob
import json
import os
import signal
import subprocess
import sys
import time

from tests.train.conftest import REPO, SMALL, TINY, _single_process_env, run_lsp  # noqa: F401  (autouse fixture)

from .faulty_entry import MODULE as FAULTY


def run_faulty(*args, timeout=300, env_extra=None):
    """`lsp ARGS` with the faults of env_extra (LSP_TEST_*: tests/reliability/faulty_entry.py) injected."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", FAULTY, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def descendants(pid):
    """Children, grandchildren, ... of a live process (all its threads), from /proc."""
    pids = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with open(path) as f:
            pids += [int(p) for p in f.read().split()]
    return pids + [d for p in pids for d in descendants(p)]


def alive(pid):
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def logged_steps(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip() and "loss" in json.loads(line))


def signal_mid_run(argv, run_dir, sig, log_dir, after_steps=2, env_extra=None, timeout=120):
    """Start `lsp ARGV` (through faulty_entry, or the python ARGV when it starts with "-c") with slowed steps and send
    SIG to its PID once AFTER_STEPS are logged.
    Returns (returncode, stdout, stderr, its descendants before the signal)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", LSP_TEST_STEP_SLEEP="0.3", **(env_extra or {}))
    argv = argv if argv[0] == "-c" else ["-m", FAULTY, *argv]
    # output to files, not pipes: surviving grandchildren would hold a pipe open and stall the read
    with open(os.path.join(log_dir, "stdout"), "w+") as out, open(os.path.join(log_dir, "stderr"), "w+") as err:
        proc = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=err, text=True, env=env, cwd=REPO)
        deadline = time.monotonic() + timeout
        try:
            while logged_steps(run_dir) < after_steps:
                assert proc.poll() is None and time.monotonic() < deadline, "no progress"
                time.sleep(0.1)
            children = descendants(proc.pid)
            proc.send_signal(sig)
            proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0), err.seek(0)
        return proc.returncode, out.read(), err.read(), children


def wait_gone(pids, seconds=10.0):
    """The pids among PIDS still alive after SECONDS (orphans are reaped by init, so gone means gone)."""
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [p for p in pids if alive(p)]
    for p in survivors:   # never leave a stray rank behind on a shared machine
        os.kill(p, signal.SIGKILL)
    return survivors
