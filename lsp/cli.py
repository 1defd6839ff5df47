"""`lsp` command line: train, launch (torchrun's elastic agent, in this process), eval, plan.

    lsp train CONFIG.yaml [key=value ...]            one process, or one rank under torchrun / accelerate
    lsp launch [--nproc-per-node N] [--nnodes M] [--node-rank R] [--rdzv-endpoint HOST:PORT] [--max-restarts K]
               CONFIG.yaml [key=value ...]           torchrun ... -m lsp.cli train CONFIG.yaml ...
    lsp eval CHECKPOINT_DIR [key=value ...]          MQAR accuracy / validation loss (+ perplexity) of a checkpoint
    lsp eval CHECKPOINT_DIR --files F [F ...]        loss and perplexity on held-out text files
    lsp generate RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
                                                     continue a prompt with the run's model (recurrent decoding)
    lsp export RUN_DIR OUT_DIR [--max-shard-mb M]    Hugging Face folder (config, safetensors, tokenizer, remote code)
    lsp plan [--gpus N] [--seq-len T] [--measure] CONFIG.yaml [key=value ...]
                                                     recommended sp, SP method, micro-batch (lsp.plan)

User errors print one line and exit with code 2 (no traceback); a non-finite stop exits 3; a run stopped by a signal
after saving its checkpoint exits 75 (run the same command again to resume).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import List, Optional

from lsp.train.signals import STOPPED_EXIT  # torch-free

USER_ERROR = 2
NONFINITE_EXIT = 3   # train.on_nonfinite=stop hit NaN/inf
RANK_EXIT_DELAY_S = 2.0   # ranks other than 0 wait this long before exiting on a shared error (see say_once)


class UserError(Exception):
    """A mistake on the command line; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse's default prints usage over several lines
        raise UserError(f"{self.prog}: {message}")


def cmd_train(args) -> int:
    from lsp.train.config import load_config
    cfg = load_config(args.config, args.overrides)   # before importing torch: fast failures
    from lsp.train.accelerate_env import apply_accelerate_env
    apply_accelerate_env(cfg)                         # `accelerate launch` flags: honoured or refused, never ignored
    from lsp.train.signals import die_with_launcher
    die_with_launcher()                               # a SIGKILLed torchrun agent leaves no orphan rank
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


def torchrun_command(args, cfg=None) -> List[str]:
    """The torchrun command line that `lsp launch` runs (in-process: lsp/train/launch.py), with the config's
    save-on-signal list forwarded to the ranks and its save timeout as the agent's grace period."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}",
           f"--nnodes={args.nnodes}", f"--max-restarts={args.max_restarts}"]
    if cfg is not None:
        from lsp.train.signals import torchrun_signals
        cmd += [f"--signals-to-handle={torchrun_signals(cfg.checkpoint.save_on_signals)}",
                f"--shutdown-timeout={cfg.checkpoint.save_timeout_s}"]
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
    cfg = launch_config(args)
    from lsp.train.launch import run_agent
    return run_agent(torchrun_command(args, cfg)[3:], cfg.checkpoint_dir)


def launch_config(args):
    """Every check that would otherwise fail in N processes at once, before any is started."""
    from lsp.train.config import ConfigError, load_config, validate
    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise UserError("--nproc-per-node and --nnodes must be >= 1")
    cfg = load_config(args.config, args.overrides)
    world = args.nproc_per_node * args.nnodes
    validate(cfg, world_size=world)
    from lsp.engines import engine_spec
    if (missing := engine_spec(cfg.parallel.engine).missing_package()) is not None:
        raise ConfigError("parallel.engine", missing)
    from lsp.train.dist import check_device
    check_device(cfg, world)
    if "OMP_NUM_THREADS" not in os.environ:   # torchrun would force 1; share the cores between the local ranks
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc_per_node))
    return cfg


def resolve_checkpoint(path: str) -> str:
    from lsp.train.runs import find_checkpoint  # torch-free: a wrong path is answered before torch is imported
    found = find_checkpoint(path)
    if found is None:
        raise UserError(f"no complete checkpoint found under {path}")
    return found


def cmd_eval(args) -> int:
    path = resolve_checkpoint(args.checkpoint)
    from lsp.train.checkpoint import load_checkpoint
    from lsp.train.config import load_config
    from lsp.train.trainer import Trainer
    if args.files:
        return eval_files(path, args.files)
    single = ["parallel.dp=0", "parallel.sp=1", "parallel.engine=ddp", "parallel.zero=0", "checkpoint.resume=false",
              "logging.wandb=false"]
    cfg = load_config(os.path.join(path, "config.yaml"), single + args.overrides)
    cfg.init_from = ""   # the checkpoint's weights are loaded below; the run's starting point may be gone
    trainer = Trainer(cfg)
    try:
        state = load_checkpoint(path, trainer.model)
    except ValueError as err:   # a DeepSpeed ZeRO checkpoint without deepspeed installed
        raise UserError(str(err)) from None
    metrics = {"checkpoint": path, "step": state["step"], **trainer.evaluate()}
    metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 700.0))
    print(json.dumps(metrics), flush=True)
    return 0


def eval_files(path: str, files: List[str]) -> int:
    """`lsp eval RUN_DIR --files ...`: held-out perplexity of the checkpoint at path (lsp.train.load)."""
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise UserError(f"--files: not found: {missing[0]}")
    from lsp.models import load_run
    from lsp.train.config import load_config
    from lsp.train.load import heldout_perplexity
    seq_len = load_config(os.path.join(path, "config.yaml"), check_files=False).data.seq_len
    try:
        model, tokenizer = load_run(path)
        metrics = heldout_perplexity(model, tokenizer, files, seq_len)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(json.dumps({"checkpoint": path, **metrics}), flush=True)
    return 0


def cmd_generate(args) -> int:
    """Print the prompt and its continuation by the newest checkpoint of a run (lsp.models.generate)."""
    import time

    import torch

    from lsp.models import load_run
    from lsp.models.generate import check_sampling
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        model, tokenizer = load_run(args.run_dir, device=args.device)
        ids = tokenizer.encode(args.prompt)
    except ValueError as err:
        raise UserError(str(err)) from None
    if not ids:
        raise UserError("--prompt is empty")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    start = time.perf_counter()
    out = model.generate(torch.tensor([ids], device=args.device), args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, generator=generator, eos_id=tokenizer.eos_id)
    seconds = time.perf_counter() - start
    print(tokenizer.decode(out[0].tolist()), flush=True)
    new = out.shape[1] - len(ids)
    print(f"lsp generate: {len(ids)} prompt + {new} new tokens in {seconds:.2f} s", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    """Write the newest checkpoint of a run as a Hugging Face model folder (lsp.export)."""
    if args.max_shard_mb <= 0:
        raise UserError(f"--max-shard-mb must be positive, got {args.max_shard_mb}")
    from lsp.export import export_run
    try:
        files = export_run(args.run_dir, args.out_dir, max_shard_bytes=int(args.max_shard_mb * 1024 ** 2))
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"lsp export: wrote {', '.join(files)} to {args.out_dir}", flush=True)
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
    p.add_argument("overrides", nargs="*", default=[], help="key=value")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("launch", help="start torchrun with `lsp train` on every rank")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--rdzv-endpoint", default="")
    p.add_argument("--rdzv-id", default="")
    p.add_argument("--max-restarts", type=int, default=0)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", default=[], help="key=value")
    p.set_defaults(func=cmd_launch)
    p = sub.add_parser("eval", help="evaluate a checkpoint (MQAR accuracy / validation loss, or held-out files)")
    p.add_argument("checkpoint")
    p.add_argument("--files", nargs="+", default=None, help="held-out text / .jsonl files: loss and perplexity")
    p.add_argument("overrides", nargs="*", default=[], help="key=value")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("generate", help="continue a prompt with a trained run's model")
    p.add_argument("run_dir")
    p.add_argument("--prompt", required=True, help="text (token ids separated by spaces for an MQAR run)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("export", help="write a run's model as a Hugging Face folder")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--max-shard-mb", type=float, default=5120.0, help="split the weights above this size")
    p.set_defaults(func=cmd_export)
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
    p.add_argument("overrides", nargs="*", default=[], help="key=value")
    p.set_defaults(func=cmd_plan)
    parser.commands = sub.choices   # name -> subparser, for parse_args
    return parser


def say_once(message: str) -> None:
    """Print a one-line error on stderr; under torchrun every rank hits the same error and rank 0 says it. The
    others exit a moment later, so the agent does not stop rank 0 before it has (lsp/train/launch.py)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)
    else:
        time.sleep(RANK_EXIT_DELAY_S)


# errors raised once torch is imported, matched by class name so that the CLI itself never imports torch
RUN_ERRORS = {"NonFiniteError": NONFINITE_EXIT, "StopRequested": STOPPED_EXIT}


def parse_args(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
    """Options may come anywhere after the subcommand: `lsp launch cfg.yaml k=v --nproc-per-node 2` is the same as
    putting them first (plain argparse took the overrides for unrecognized arguments)."""
    if argv and argv[0] in parser.commands:
        return parser.commands[argv[0]].parse_intermixed_args(argv[1:])
    if argv and not argv[0].startswith("-"):
        from lsp.train.config import did_you_mean
        raise UserError(f"lsp: unknown command {argv[0]!r} (one of {', '.join(parser.commands)})"
                        + did_you_mean(argv[0], parser.commands))
    return parser.parse_args(argv)   # no subcommand, or -h: argparse's own answer


def main(argv: Optional[List[str]] = None) -> int:
    from lsp.train.config import ConfigError
    try:
        args = parse_args(build_parser(), sys.argv[1:] if argv is None else argv)
        return args.func(args)
    except ConfigError as err:
        say_once(f"config error: {err}")
    except UserError as err:
        say_once(f"error: {err}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:   # every rank stops at the same step; one of them says so
        code = RUN_ERRORS.get(type(err).__name__)
        if code is None:
            raise
        say_once(f"{'lsp' if code == STOPPED_EXIT else 'error'}: {err}")
        return code
    return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
