"""Shape-keyed choice of block size, warps and stages for the chunk-level Triton kernels; spilling configs pruned.

On CUDA the first launch of a kernel for a key (head dims, decay form, dtype, device) compiles every candidate
(`JITFunction.warmup`), drops those whose ptxas report has spill stores (`CompiledKernel.n_spills`), times the rest
(`triton.testing.do_bench`) and caches the fastest for the key; later launches reuse it. If compiling or timing
fails, the first candidate is used. Elsewhere (the interpreter: no compiler, no meaningful timing) the first
candidate is used: it is the config that tests/ops/test_triton_sm90.py compiles for sm_90a and finds spill-free.
Only kernels that overwrite their outputs are tuned (a timing run must not accumulate into a result).

Status: the selection logic is tested on CPU (tests/ops/test_triton_tune.py); the CUDA compile / timing calls are
not yet run on a GPU.
"""
from __future__ import annotations

import warnings
from typing import Callable

# candidates per kernel, the first is the default; block sizes (BV, BK) change the grid, so the launcher's grid is a
# function of the config. The default must compile without spills for both sm_80 (A100) and sm_90a (H100), since it
# is what runs where nothing is tuned and what a failed tuning falls back to (ptxas, bf16 and fp16, every decay form:
# tests/ops/test_triton_sm90.py): _out_kernel with BV=64 spills 192 B on sm_80 (scalar decay), _state_dkdv_kernel
# with 64-blocks 40-60 B on sm_80 at any stage count with per-key decay. The larger blocks stay candidates: on each
# GPU the tuner drops those that spill there and times the rest, so the choice per architecture is made here, by
# the same kernels.
CANDIDATES = {
    "_out_kernel": [dict(BV=32, num_warps=8, num_stages=3), dict(BV=64, num_warps=8, num_stages=3),
                    dict(BV=64, num_warps=8, num_stages=2), dict(BV=32, num_warps=4, num_stages=3)],
    "_dv_kernel": [dict(BV=64, num_warps=8, num_stages=3), dict(BV=64, num_warps=8, num_stages=2),
                   dict(BV=32, num_warps=4, num_stages=3), dict(BV=32, num_warps=8, num_stages=3)],
    "_dqk_kernel": [dict(BV=32, num_warps=8, num_stages=3), dict(BV=32, num_warps=8, num_stages=2),
                    dict(BV=64, num_warps=8, num_stages=3), dict(BV=32, num_warps=4, num_stages=3)],
    "_state_dkdv_kernel": [dict(BK=32, BV=32, num_warps=8, num_stages=3),
                           dict(BK=64, BV=64, num_warps=8, num_stages=3),
                           dict(BK=64, BV=64, num_warps=8, num_stages=2),
                           dict(BK=64, BV=64, num_warps=8, num_stages=1)],
}


class Tuner:
    """Cache of the chosen config per (kernel, key)."""

    def __init__(self, candidates: dict[str, list[dict]]):
        self.candidates = candidates
        self.cache: dict[tuple, dict] = {}

    def pick(self, name: str, key: tuple, spills: Callable[[dict], int] | None,
             timing: Callable[[dict], float] | None) -> dict:
        """The cached config for (name, key), else: drop candidates with spills(cfg) > 0 (all spill: keep the
        first), take the fastest by timing(cfg), cache it. spills / timing None (no compiler): the first."""
        if (name, key) in self.cache:
            return self.cache[name, key]
        options = self.candidates[name]
        best = options[0]
        if spills is not None and timing is not None:
            try:
                clean = [c for c in options if spills(c) == 0] or options[:1]
                best = min(clean, key=timing) if len(clean) > 1 else clean[0]
            except Exception as e:  # noqa: BLE001 - a failed tuning run must not fail the op
                warnings.warn(f"autotuning {name} failed ({e}); using its default config", stacklevel=2)
        self.cache[name, key] = best
        return best


TUNER = Tuner(CANDIDATES)


def launch(kernel, name: str, grid_of: Callable[[dict], tuple], args: tuple, fixed: dict, key: tuple,
           caps: dict | None = None, tuner: Tuner | None = None) -> None:
    """Launch kernel[grid_of(cfg)](*args, **fixed, **cfg) with cfg tuned for key on CUDA (first candidate
    elsewhere); caps bound block sizes (a 64-wide block for a 16-wide head dim only wastes work)."""
    caps = caps or {}
    spills = timing = None
    if args[0].is_cuda:
        import triton.testing

        def spills(cfg):
            cfg = {k: min(v, caps[k]) if k in caps else v for k, v in cfg.items()}
            compiled = kernel.warmup(*args, grid=grid_of(cfg), **fixed, **cfg)
            if hasattr(compiled, "_init_handles"):
                compiled._init_handles()
            return getattr(compiled, "n_spills", 0) or 0

        def timing(cfg):
            cfg = {k: min(v, caps[k]) if k in caps else v for k, v in cfg.items()}
            return triton.testing.do_bench(lambda: kernel[grid_of(cfg)](*args, **fixed, **cfg), warmup=5, rep=20)

    chosen = (tuner or TUNER).pick(name, key, spills, timing)   # another op family passes its own tuner
    cfg = {k: min(v, caps[k]) if k in caps else v for k, v in chosen.items()}
    kernel[grid_of(cfg)](*args, **fixed, **cfg)
