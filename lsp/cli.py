"""`lsp` command line: train, launch (torchrun wrapper), eval, plan.

    lsp train CONFIG.yaml [key=value ...]            one process, or one rank under torchrun / accelerate
    lsp launch [--nproc-per-node N] [--nnodes M] [--node-rank R] [--rdzv-endpoint HOST:PORT] [--max-restarts K]
               CONFIG.yaml [key=value ...]           torchrun ... -m lsp.cli train CONFIG.yaml ...
    lsp eval CHECKPOINT_DIR [key=value ...]          MQAR accuracy / validation loss of a checkpoint
    lsp plan [--gpus N] [--seq-len T] [--measure] CONFIG.yaml [key=value ...]
                                                     recommended sp, SP method, micro-batch (lsp.plan)

User errors print one line and exit with code 2 (no traceback).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from typing import List, Optional

USER_ERROR = 2
NONFINITE_EXIT = 3   # train.on_nonfinite=stop hit NaN/inf


class UserError(Exception):
    """A mistake on the command line; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse's default prints usage over several lines
        raise UserError(f"{self.prog}: {message}")


def cmd_train(args) -> int:
    from lsp.train.config import load_config
    cfg = load_config(args.config, args.overrides)   # before importing torch: fast failures
    from lsp.train.dist import shutdown
    from lsp.train.trainer import train
    try:
        result = train(cfg)
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        final = {k: v for k, v in result.items() if k != "losses"}
        print("final " + json.dumps(final), flush=True)
    return 0


def torchrun_command(args) -> List[str]:
    """The torchrun command line that `lsp launch` runs (also used by launch/torchrun.sh and the tests)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}",
           f"--nnodes={args.nnodes}", f"--max-restarts={args.max_restarts}"]
    if args.rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}", f"--node-rank={args.node_rank}"]
        if args.rdzv_id:
            cmd.append(f"--rdzv-id={args.rdzv_id}")
    elif args.nnodes == 1:
        cmd.append("--standalone")
    else:
        raise UserError("--rdzv-endpoint HOST:PORT is required with --nnodes > 1")
    return cmd + ["-m", "lsp.cli", "train", args.config, *args.overrides]


def cmd_launch(args) -> int:
    from lsp.train.config import ConfigError, load_config, validate
    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise UserError("--nproc-per-node and --nnodes must be >= 1")
    cfg = load_config(args.config, args.overrides)
    validate(cfg, world_size=args.nproc_per_node * args.nnodes)   # fail here, not in N processes
    if cfg.parallel.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("parallel.engine", "deepspeed is not installed (pip install 'lsp[deepspeed]'), "
                          "or use parallel.engine=ddp / fsdp")
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:   # torchrun would force 1; share the cores between the local ranks instead
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc_per_node))
    return subprocess.call(torchrun_command(args), env=env)


def resolve_checkpoint(path: str) -> str:
    if not os.path.isdir(path):   # checked before importing torch, so the error is instant
        raise UserError(f"no complete checkpoint found under {path}")
    from lsp.train.checkpoint import is_complete, latest_checkpoint
    for candidate in (path, os.path.join(path, "checkpoints")):
        if is_complete(candidate):
            return candidate
        found = latest_checkpoint(candidate)
        if found:
            return found
    raise UserError(f"no complete checkpoint found under {path}")


def cmd_eval(args) -> int:
    from lsp.train.checkpoint import load_checkpoint
    from lsp.train.config import load_config
    from lsp.train.trainer import Trainer
    path = resolve_checkpoint(args.checkpoint)
    single = ["parallel.dp=0", "parallel.sp=1", "parallel.engine=ddp", "parallel.zero=0", "checkpoint.resume=false",
              "logging.wandb=false"]
    cfg = load_config(os.path.join(path, "config.yaml"), single + args.overrides)
    trainer = Trainer(cfg)
    state = load_checkpoint(path, trainer.model)
    metrics = {"checkpoint": path, "step": state["step"], **trainer.evaluate()}
    print(json.dumps(metrics), flush=True)
    return 0


def cmd_plan(args) -> int:
    """Recommend sp size, SP method, micro-batch and activation checkpointing for a cluster (lsp.plan)."""
    from lsp.train.config import load_config
    cfg = load_config(args.config, args.overrides, check_files=False)   # planning needs no data
    from lsp.names import SP_METHODS
    from lsp.plan.planner import Cluster, format_candidates, plan_cluster, recommend
    for flag, value in (("--gpus", args.gpus), ("--world", args.world), ("--seq-len", args.seq_len),
                        ("--gpu-mem-gb", args.gpu_mem_gb), ("--tflops", args.tflops),
                        ("--gpus-per-node", args.gpus_per_node), ("--top", args.top)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    gpus = args.gpus or max(1, cfg.parallel.dp) * (args.world or cfg.parallel.sp)
    if args.world and gpus % args.world:
        raise UserError(f"--world {args.world} does not divide --gpus {gpus}")
    cluster = Cluster(gpus=gpus, gpus_per_node=args.gpus_per_node, memory_gb=args.gpu_mem_gb, tflops=args.tflops)
    T = args.seq_len or cfg.data.seq_len
    kw = dict(vocab_size=cfg.model.vocab_size or 257, seq_len=T, sp_choices=[args.world] if args.world else None)
    if args.measure:
        return _measure(cfg, gpus, args.gpu_mem_gb, cfg.model.vocab_size or 257)
    rows = plan_cluster(cfg, cluster, **kw)
    best = recommend(cfg, cluster, rows=rows, **kw)   # one line (exit 2) when nothing fits
    batch = best.micro_batch * best.grad_accum * best.dp
    print(f"{cfg.name}: seq_len={T}, {gpus} GPUs x {args.gpu_mem_gb:g} GB, {args.tflops:g} TFLOP/s each, "
          f"global batch {batch} sequences, engine={cfg.parallel.engine} zero={cfg.parallel.zero} "
          "(modelled: lsp/plan/planner.py)")
    print(format_candidates(rows, limit=args.top))
    same_sp = [c for c in rows if c.sp == best.sp and c.micro_batch == best.micro_batch
               and c.checkpointing == best.checkpointing]
    print(f"\nSP methods at sp={best.sp}: " + ", ".join(
        f"{c.method} {c.step_s:.3f} s" for m in SP_METHODS for c in same_sp if c.method == m))
    print(f"recommended ({best.tokens_per_s_per_gpu:.4g} tokens/s/GPU, {best.memory_gb:.1f} GB/GPU): "
          f"{best.overrides()}")
    return 0


def _measure(cfg, gpus: int, gpu_mem_gb: float, vocab_size: int) -> int:
    """`lsp plan --measure`: rank 0 of the configured launch, one step on fake tensors (lsp.plan.measure)."""
    from lsp.plan.measure import GB, measure, modelled, report
    from lsp.train.config import hybrid_config, validate
    validate(cfg, world_size=gpus, check_files=False)   # the launch must exist: sp divides the GPUs
    mcfg = hybrid_config(cfg, vocab_size)
    got = measure(cfg, mcfg, gpus)
    print(report(cfg.name, gpus, got, modelled(cfg, mcfg, gpus)), flush=True)
    if got.peak > gpu_mem_gb * GB:
        raise UserError(f"--gpu-mem-gb {gpu_mem_gb:g}: the measured peak {got.peak / GB:.2f} GB per GPU does not fit")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lsp", description="Exact sequence-parallel training of hybrid linear/softmax LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train (one process, or one rank under torchrun)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("launch", help="start torchrun with `lsp train` on every rank")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--rdzv-endpoint", default="")
    p.add_argument("--rdzv-id", default="")
    p.add_argument("--max-restarts", type=int, default=0)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value")
    p.set_defaults(func=cmd_launch)
    p = sub.add_parser("eval", help="evaluate a checkpoint (MQAR accuracy / validation loss)")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("plan", help="recommend sp size, SP method, micro-batch for a config on a cluster")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs in the job (default: parallel.dp x (--world or parallel.sp))")
    p.add_argument("--world", type=int, default=None, help="fix the SP size instead of searching it")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: data.seq_len)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem-gb", type=float, default=80.0)
    p.add_argument("--tflops", type=float, default=400.0, help="sustained bf16 TFLOP/s per GPU")
    p.add_argument("--top", type=int, default=10, help="candidates to print")
    p.add_argument("--measure", action="store_true",
                   help="run one step of the configured launch on fake tensors and compare with the model")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from lsp.train.config import ConfigError
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
    except Exception as err:   # NonFiniteError: one line, its own exit code (torch is imported by now)
        if type(err).__name__ != "NonFiniteError":
            raise
        if int(os.environ.get("RANK", "0")) == 0:   # every rank stops at the same step; one of them says so
            print(f"error: {err}", file=sys.stderr)
        return NONFINITE_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
