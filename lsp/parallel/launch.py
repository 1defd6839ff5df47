"""`spawn`: run a function on W real gloo ranks (torch.multiprocessing) for tests and benchmarks."""
from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results, timeout_s, threads):
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        try:
            results[rank] = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException as e:  # report any failure with its rank, then let the parent raise
        results[rank] = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")


def spawn(fn, world_size: int, *args, timeout_s: float = 120.0, threads: int = 1) -> list:
    """Run fn(rank, world_size, *args) on `world_size` gloo processes; returns the per-rank return values.

    fn must be importable (a module-level function) and return picklable values. A failure on any rank raises
    RuntimeError naming the rank and carrying its traceback; a hung collective fails after `timeout_s`.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, timeout_s, threads))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s + 60)
        for p in procs:
            if p.is_alive():
                p.kill()
        out = dict(results)
    failed = {r: out.get(r, ("error", "process died without a result (killed or timed out)"))[1]
              for r in range(world_size) if out.get(r, ("error",))[0] != "ok"}
    if failed:
        # the root cause first: peers of a crashed rank only report a closed connection or a timeout
        secondary = ("Connection closed by peer", "Timed out", "died without a result")
        r = min(failed, key=lambda r: (any(s in failed[r] for s in secondary), r))
        others = ", ".join(str(o) for o in failed if o != r)
        raise RuntimeError(f"rank {r} of {world_size} failed: {failed[r]}"
                           + (f"\n(also failed: ranks {others})" if others else ""))
    return [out[r][1] for r in range(world_size)]
