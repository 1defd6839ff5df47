"""Compile Triton kernels for sm_90a (H100) or sm_80 (A100) without a GPU and read ptxas's report: registers, spill
bytes, wgmma.

    capture_launches(fn)          # run fn under TRITON_INTERPRET=1, record every distinct kernel launch
    python -m tests.ops.sm90_compile kernels.json [80|90]   # child process without the interpreter: a JSON line each

Used by tests/ops/test_triton_sm90.py (the same logic as the developers' sm90_report.py, kept in the repo).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64"}


def ptxas_path() -> str | None:
    """Triton's bundled ptxas (knows sm_90a), else one on PATH."""
    try:
        import triton
    except ImportError:
        return None
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas-blackwell")
    return bundled if os.path.exists(bundled) else shutil.which("ptxas")


def _signature(jit_fn, args, kwargs):
    # -> (signature {name: type or "constexpr"}, constants {name: value}) of one launch
    params = [p.name for p in jit_fn.params]
    bound = dict(zip(params, args), **{k: v for k, v in kwargs.items() if k in params})
    sig, consts = {}, {}
    for p in jit_fn.params:
        value = bound.get(p.name)
        if p.is_constexpr or value is None or isinstance(value, bool):
            consts[p.name] = value
            sig[p.name] = "constexpr"
        elif isinstance(value, torch.Tensor):
            sig[p.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, int):
            sig[p.name] = "i32" if abs(value) < 2**31 else "i64"
        else:
            sig[p.name] = "fp32"
    return sig, consts


def capture_launches(fn) -> list:
    """Run fn() with the interpreter's launch patched; -> distinct [module, name, signature, constants, warps,
    stages] of every kernel launched."""
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    seen = {}
    original = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup=False, **kwargs):
        sig, consts = _signature(JITFunction(self.fn), args, kwargs)
        warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
        key = (self.fn.__name__, json.dumps(sig, sort_keys=True), json.dumps(consts, sort_keys=True), warps, stages)
        seen.setdefault(key, [self.fn.__module__, self.fn.__name__, sig, consts, warps, stages])
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = run
    try:
        fn()
    finally:
        interpreter.InterpretedFunction.run = original
    return list(seen.values())


def compile_report(items: list, ptxas: str, arch: int = 90) -> list[dict]:
    """Compile each captured kernel for sm_90a (arch 90) or sm_80 (no interpreter in this process) and parse
    ptxas -v."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out, tmp = [], tempfile.mkdtemp()
    for i, (module, name, sig, consts, warps, stages) in enumerate(items):
        jit_fn = getattr(importlib.import_module(module), name)
        compiled = triton.compile(ASTSource(jit_fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=warps, num_stages=stages))
        ptx = compiled.asm["ptx"]
        path = os.path.join(tmp, f"k{i}.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        target = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"   # sm_90a: wgmma and the bulk copies
        log = subprocess.run([ptxas, f"-arch={target}", "-v", path, "-o", os.devnull], capture_output=True,
                             text=True).stderr
        regs = re.search(r"Used (\d+) registers", log)
        spill = re.search(r"(\d+) bytes spill stores", log)
        out.append(dict(name=name, warps=warps, consts={k: v for k, v in consts.items() if v is not None},
                        regs=int(regs.group(1)) if regs else -1, spill=int(spill.group(1)) if spill else -1,
                        wgmma="wgmma" in ptx, mma="mma.sync" in ptx))
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        for row in compile_report(json.load(f), ptxas_path(), int(sys.argv[2]) if len(sys.argv) > 2 else 90):
            print(json.dumps(row))
