"""Where the time of one HybridLM training step (forward + backward + AdamW) goes, on CPU.

    python benchmarks/profile_step.py                                 # LLLS, 2048 tokens, d=128, 8 layers
    python benchmarks/profile_step.py --gloo 2                        # the same on 2 real gloo ranks (rank 0 shown)
    python benchmarks/profile_step.py --baseline 311b8c5              # + side-by-side step time vs an old chunk.py
    python benchmarks/profile_step.py --quick                         # CI smoke

Prints (Markdown):
1. the top aten ops of one step by self time (torch.profiler);
2. a split into matmuls, other aten ops (elementwise, reductions, copies), collectives, the optimizer, and the
   rest = wall time - time inside aten ops (Python, autograd engine, dispatcher: the framework overhead);
3. forward time by lsp component (record_function labels put on every module: attn.L, attn.S, mlp, norm, loss);
4. with --baseline REV[,REV2]: the time of the linear-attention op alone (fwd+bwd) and of the step with
   lsp/ops/linear/chunk.py as of each git revision (loaded from git into the running process) next to the current
   one, interleaved, best of --repeats, and the speed-up.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table  # noqa: E402

import lsp.ops.linear.api as lin_api  # noqa: E402
import lsp.ops.linear.local as lin_local  # noqa: E402
from lsp.models import HybridConfig, HybridLM, LinearKind  # noqa: E402
from lsp.models.layers import RMSNorm, SoftmaxAttention, SwiGLU  # noqa: E402

MATMUL = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}
COMM_WORDS = ("gloo", "c10d", "all_gather", "allgather", "all_reduce", "allreduce", "send", "recv", "broadcast")


def label_modules(model: torch.nn.Module) -> None:
    """Wrap every attention / MLP / norm module's forward in a record_function range named after its kind."""
    def name_of(m):
        if isinstance(m, LinearKind):
            return "lsp.attn.L"
        if isinstance(m, SoftmaxAttention):
            return "lsp.attn.S"
        if isinstance(m, SwiGLU):
            return "lsp.mlp"
        if isinstance(m, RMSNorm):
            return "lsp.norm"
        return None

    for m in model.modules():
        label = name_of(m)
        if label is None or getattr(m, "_lsp_labelled", False):
            continue
        m._lsp_labelled = True

        def pre(mod, args, label=label):
            mod._lsp_range = record_function(label)
            mod._lsp_range.__enter__()

        def post(mod, args, out):
            mod._lsp_range.__exit__(None, None, None)

        # attention and norm modules nest (o_norm inside attn): ranges nest too, self time stays per label
        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)


def build(args, sp=None):
    torch.manual_seed(0)
    cfg = HybridConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                       layer_pattern=args.pattern, linear_attn=args.linear_attn)
    model = HybridLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    W = 1 if sp is None else sp.world_size
    T = args.tokens * W
    ids = torch.randint(0, args.vocab, (1, T))
    labels = ids.roll(-1, dims=1)
    if sp is not None:
        ids, labels = sp.shard(ids, dim=1), sp.shard(labels, dim=1)

    def step():
        with record_function("lsp.forward"):
            out = model(ids, labels=labels, sp=sp)
        with record_function("lsp.backward"):
            out.loss.backward()
        with record_function("lsp.optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    return model, step


def wall(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_step(args, sp=None) -> dict:
    """Warm up, time the step without the profiler, then profile one step; returns printable rows."""
    model, step = build(args, sp)
    label_modules(model)
    step()
    t_wall = wall(step, args.repeats)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    ms = lambda us: round(us / 1e3, 2)  # noqa: E731
    aten = [e for e in events if e.key.startswith("aten::")]
    t_aten = sum(e.self_cpu_time_total for e in aten)
    t_prof = sum(e.self_cpu_time_total for e in events)
    top = sorted(aten, key=lambda e: -e.self_cpu_time_total)[: args.top]
    top_rows = [{"op": e.key, "calls": e.count, "self_ms": ms(e.self_cpu_time_total),
                 "share_%": round(100 * e.self_cpu_time_total / t_prof, 1)} for e in top]
    split = {"matmul (mm/bmm/addmm)": sum(e.self_cpu_time_total for e in aten if e.key in MATMUL),
             "collectives (gloo / c10d)": sum(e.self_cpu_time_total for e in events
                                              if any(w in e.key.lower() for w in COMM_WORDS)
                                              and not e.key.startswith("aten::")),
             "other aten (elementwise, reductions, copies)": sum(e.self_cpu_time_total for e in aten
                                                                 if e.key not in MATMUL)}
    split["framework overhead (Python, autograd engine, dispatch)"] = max(0.0, t_prof - sum(split.values()))
    split_rows = [{"where": k, "ms": ms(v), "share_%": round(100 * v / t_prof, 1)} for k, v in split.items()]
    phases = {e.key: e.cpu_time_total for e in events if e.key.startswith("lsp.")}
    comp_rows = [{"range": k, "total_ms": ms(v)} for k, v in sorted(phases.items())]
    return {"wall_ms": round(t_wall * 1e3, 1), "profiled_ms": ms(t_prof), "aten_ms": ms(t_aten),
            "top": top_rows, "split": split_rows, "components": comp_rows}


def _gloo_worker(rank, world_size, args):
    from lsp.parallel import SPContext
    return profile_step(args, SPContext(layout="zigzag"))


def load_chunk_module(rev: str):
    """lsp/ops/linear/chunk.py as of git revision `rev`, imported as a sibling module (same relative imports)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{rev}:lsp/ops/linear/chunk.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("lsp.ops.linear._chunk_baseline", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "lsp.ops.linear"
    sys.modules[spec.name] = mod  # dataclasses resolve their annotations through sys.modules
    exec(compile(src, f"{rev}:lsp/ops/linear/chunk.py", "exec"), mod.__dict__)
    return mod


def use_chunk_module(mod) -> None:
    """Route the op and, where the revision has the two-phase split, the SP local pass through `mod`."""
    lin_api.chunk_linear_attention = mod.chunk_linear_attention
    for name in ("chunk_prepare", "chunk_states", "chunk_output"):
        if hasattr(mod, name):
            setattr(lin_local, name, getattr(mod, name))


def compare_baseline(args) -> list[dict]:
    """Step time with chunk.py at each revision of args.baseline (comma list) vs the working tree, interleaved (same
    process, same model and data), best of `repeats` rounds."""
    import lsp.ops.linear.chunk as current
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    path = "lsp/ops/linear/chunk.py"
    now = git("log", "-1", "--format=%h", "--", path) + ("+edits" if git("status", "--porcelain", path) else "")
    versions = [(rev, load_chunk_module(rev)) for rev in args.baseline.split(",")] + [(now, current)]
    rows = []
    op = compare_op(args, versions)
    op[f"speedup {versions[0][0]} -> {now}"] = round(op[f"step_s @ {versions[0][0]}"] / op[f"step_s @ {now}"], 2)
    rows.append(op)
    for pattern in args.compare_patterns.split(","):
        a = argparse.Namespace(**{**vars(args), "pattern": pattern})
        _, step = build(a)
        best = {name: float("inf") for name, _ in versions}
        for _, mod in versions:  # warm-up every version
            use_chunk_module(mod)
            step()
        for _ in range(args.repeats):
            for name, mod in versions:
                use_chunk_module(mod)
                t0 = time.perf_counter()
                step()
                best[name] = min(best[name], time.perf_counter() - t0)
        use_chunk_module(current)
        row = {"pattern": pattern, "tokens": args.tokens}
        row.update({f"step_s @ {name}": round(t, 3) for name, t in best.items()})
        row[f"speedup {versions[0][0]} -> {now}"] = round(best[versions[0][0]] / best[now], 2)
        rows.append(row)
    return rows


def compare_op(args, versions) -> dict:
    """fwd+bwd time of the chunked linear-attention op alone (decay form of args.linear_attn, H=heads, K=head_dim,
    T=tokens) for each (name, chunk module), interleaved, best of max(repeats, 5)."""
    H, K, T = args.heads, args.hidden // args.heads, args.tokens
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, H, K, generator=gen, requires_grad=True) for _ in range(3))
    shape = {"gla": (1, T, H, K), "simple_gla": (1, T, H, 1), "lightning": (H, 1), "linear": None}[args.linear_attn]
    g = None if shape is None else (torch.nn.functional.logsigmoid(torch.randn(*shape, generator=gen)) / 16)
    best = {name: float("inf") for name, _ in versions}
    for _ in range(max(args.repeats, 5)):
        for name, mod in versions:
            t0 = time.perf_counter()
            o, _ = mod.chunk_linear_attention(q, k, v, g, K ** -0.5)
            o.sum().backward()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {"pattern": f"op only ({args.linear_attn})", "tokens": T,
            **{f"step_s @ {n}": round(t, 4) for n, t in best.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pattern", default="LLLS")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--linear-attn", default="gla")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gloo", type=int, default=0, help="run on this many real gloo ranks (rank 0 reported)")
    p.add_argument("--emulate", type=int, default=0, help="run under SPContext(emulate=W)")
    p.add_argument("--baseline", default="",
                   help="git revision(s) (comma list) of lsp/ops/linear/chunk.py to compare against")
    p.add_argument("--compare-patterns", default="L,LLLS,S")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.layers, args.heads, args.repeats, args.top = 128, 32, 2, 2, 1, 5
        args.compare_patterns = "L"
    torch.set_num_threads(args.threads)
    if args.gloo:
        from lsp.parallel import spawn
        res = spawn(_gloo_worker, args.gloo, args, threads=args.threads, timeout_s=600)[0]
        where = f"rank 0 of {args.gloo} gloo ranks"
    elif args.emulate:
        from lsp.parallel import SPContext
        res, where = profile_step(args, SPContext(emulate=args.emulate)), f"SPContext(emulate={args.emulate})"
    else:
        res, where = profile_step(args), "one process"
    print(f"\n{args.pattern} {args.linear_attn}, {args.tokens} tokens/rank, d={args.hidden}, {args.layers} layers, "
          f"{where}, {args.threads} thread(s): step wall {res['wall_ms']} ms (median of {args.repeats}), "
          f"profiled step {res['profiled_ms']} ms, inside aten ops {res['aten_ms']} ms")
    print_table(res["top"], "Top aten ops of one step (self time)")
    print_table(res["split"], "Where the step's time goes")
    print_table(res["components"], "record_function ranges (total time incl. children; forward only for modules)")
    out = dict(res)
    if args.baseline:
        out["compare"] = compare_baseline(args)
        print_table(out["compare"], f"Step time (s, best of {args.repeats}): "
                                      f"lsp/ops/linear/chunk.py at {args.baseline} vs now, interleaved")
    return out


if __name__ == "__main__":
    main()
