"""`lsp` command line: train, launch (torchrun's elastic agent, in this process), eval, plan.

    lsp train CONFIG.yaml [key=value ...]            one process, or one rank under torchrun / accelerate
    lsp launch [--nproc-per-node N] [--nnodes M] [--node-rank R] [--rdzv-endpoint HOST:PORT] [--max-restarts K]
               CONFIG.yaml [key=value ...]           torchrun ... -m lsp.cli train CONFIG.yaml ...
    lsp eval CHECKPOINT_DIR [key=value ...]          MQAR accuracy / validation loss (+ perplexity) of a checkpoint
    lsp eval CHECKPOINT_DIR --files F [F ...]        loss and perplexity on held-out text files
    lsp generate RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
                                                     continue a prompt with the run's model (recurrent decoding)
    lsp export RUN_DIR OUT_DIR [--max-shard-mb M]    Hugging Face folder (config, safetensors, tokenizer, remote code)
    lsp plan [--gpus N] [--world W] [--seq-len T] [--measure] CONFIG.yaml [key=value ...]
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
    from lsp.run_config import load_config
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
    from lsp.run_config import ConfigError, check_world, load_config
    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise UserError("--nproc-per-node and --nnodes must be >= 1")
    cfg = load_config(args.config, args.overrides)
    world = args.nproc_per_node * args.nnodes
    check_world(cfg, world)
    from lsp.engines import engine_spec
    if (missing := engine_spec(cfg.parallel.engine).missing_package()) is not None:
        raise ConfigError("parallel.engine", missing)
    from lsp.train.dist import check_device
    check_device(cfg, world)
    if "OMP_NUM_THREADS" not in os.environ:   # torchrun would force 1; share the cores between the local ranks
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc_per_node))
    return cfg


def resolve_checkpoint(path: str) -> str:
    from lsp.train.runs import find_checkpoint, require_intact  # torch-free: answered before torch is imported
    found = find_checkpoint(path)
    if found is None:
        raise UserError(f"no complete checkpoint found under {path}")
    try:
        require_intact(found)
    except ValueError as err:
        raise UserError(str(err)) from None
    return found


def cmd_eval(args) -> int:
    path = resolve_checkpoint(args.checkpoint)
    from lsp.run_config import load_config
    from lsp.train.checkpoint import load_checkpoint
    from lsp.train.trainer import Trainer
    if args.files:
        return eval_files(path, args.files)
    single = ["parallel.dp=0", "parallel.sp=1", "parallel.ep=1", "parallel.engine=ddp", "parallel.zero=0",
              "checkpoint.resume=false", "logging.wandb=false"]
    cfg = load_config(os.path.join(path, "config.yaml"), single + args.overrides)
    cfg.init_from = ""   # the checkpoint's weights are loaded below; the run's starting point may be gone
    trainer = Trainer(cfg)
    if not trainer.data.has_validation:
        raise UserError(f"{path}: the run has no validation windows (data.val_fraction={cfg.data.val_fraction}); "
                        f"measure held-out text with: lsp eval {args.checkpoint} --files FILE ...")
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
    from lsp.run_config import file_problem
    problems = [p for p in map(file_problem, files) if p is not None]
    if problems:
        raise UserError(f"--files: {problems[0]}")
    from lsp.run_config import load_config
    from lsp.train import load_run
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

    from lsp.models.generate import check_sampling
    from lsp.train import load_run
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        check_torch_device(args.device)
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


def check_torch_device(name: str) -> None:
    """--device NAME names a device this torch can use (ValueError in one line otherwise)."""
    import torch
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a torch device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"--device {name}: this torch {torch.__version__} has no CUDA ({built}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")


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
    for flag, value in (("--gpus", args.gpus), ("--world", args.world), ("--seq-len", args.seq_len),
                        ("--gpu-mem-gb", args.gpu_mem_gb), ("--tflops", args.tflops),
                        ("--gpus-per-node", args.gpus_per_node), ("--top", args.top)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if args.measure:
        return _measure(args)
    from lsp.run_config import load_config
    cfg = load_config(args.config, args.overrides, check_files=False)   # planning needs no data
    from lsp.parallel import softmax_methods, sp_methods
    from lsp.plan.planner import Cluster, format_candidates, plan_cluster, recommend
    from lsp.run_config import hybrid_config
    gpus, source = plan_gpus(args, cfg)
    if args.world and gpus % args.world:
        raise UserError(f"--world {args.world} does not divide --gpus {gpus}")
    cluster = Cluster(gpus=gpus, gpus_per_node=args.gpus_per_node, memory_gb=args.gpu_mem_gb, tflops=args.tflops)
    T = args.seq_len or cfg.data.seq_len
    kw = dict(vocab_size=cfg.model.vocab_size or 257, seq_len=T, sp_choices=[args.world] if args.world else None)
    rows = plan_cluster(cfg, cluster, **kw)
    best = recommend(cfg, cluster, rows=rows, **kw)   # one line (exit 2) when nothing fits
    batch = best.micro_batch * best.grad_accum * best.dp
    print(f"{cfg.name}: seq_len={T}, {gpus} GPUs x {args.gpu_mem_gb:g} GB, {args.tflops:g} TFLOP/s each, "
          f"global batch {batch} sequences, engine={cfg.parallel.engine} zero={cfg.parallel.zero} "
          "(modelled: lsp/plan/planner.py)")
    print(f"planned for {gpus} GPUs: {source}")
    print(format_candidates(rows, limit=args.top))
    same_sp = [c for c in rows if c.sp == best.sp and c.micro_batch == best.micro_batch
               and c.checkpointing == best.checkpointing]
    print(f"\nSP methods at sp={best.sp}: " + ", ".join(
        f"{c.method} {c.step_s:.3f} s" for m in sp_methods() for c in same_sp
        if c.method == m and c.softmax_method == best.softmax_method))
    if "S" in hybrid_config(cfg, kw["vocab_size"]).layer_types and best.sp > 1:
        print(f"softmax methods at sp={best.sp}: " + ", ".join(
            f"{c.softmax_method} {c.step_s:.3f} s ({c.memory_gb:.1f} GB)" for m in softmax_methods() for c in same_sp
            if c.softmax_method == m and c.method == best.method))
    print(f"recommended ({best.tokens_per_s_per_gpu:.4g} tokens/s/GPU, {best.memory_gb:.1f} GB/GPU): "
          f"{best.overrides()}")
    if cfg.model.moe_experts:   # the MoE figures at the config's ep and layout (lsp/plan/moe.py)
        from lsp.plan.moe import format_moe, moe_figures
        p, t = cfg.parallel, cfg.train
        figures = moe_figures(hybrid_config(cfg, kw["vocab_size"]), ep=p.ep, sp=p.sp, micro_batch=t.micro_batch,
                              grad_accum=t.grad_accum, seq_len=T, checkpointing=t.activation_checkpointing)
        print("\n" + format_moe(figures, p.ep))
    return 0


def plan_gpus(args, cfg):
    """(GPUs to plan for, where that number came from): --gpus, else the config's own launch dp x sp (dp=0, "as
    many as the launch gives", counts as 1: the smallest launch of the config)."""
    if args.gpus:
        return args.gpus, "--gpus"
    p, sp = cfg.parallel, args.world or cfg.parallel.sp
    sp_from = "--world" if args.world else "parallel.sp"
    if p.dp:
        return p.dp * sp, f"the config's launch, parallel.dp={p.dp} x {sp_from}={sp} (--gpus N for another)"
    return sp, (f"the config's smallest launch, {sp_from}={sp} with parallel.dp=0 taken as 1 "
                "(set parallel.dp or pass --gpus N for a larger job)")


def _measure(args) -> int:
    """`lsp plan --measure`: rank 0 of one launch, one step on fake tensors (lsp.plan.measure). --seq-len and
    --world are the overrides data.seq_len and parallel.sp, --gpus the world size (dp = GPUs / sp), so the config
    is validated once with them and the step measured is the one printed."""
    from lsp.run_config import check_world, hybrid_config, load_config
    flags = [f"data.seq_len={args.seq_len}"] * bool(args.seq_len) + [f"parallel.sp={args.world}"] * bool(args.world)
    flags += ["parallel.dp=0"] * bool(args.gpus)   # the GPUs given decide dp
    cfg = load_config(args.config, args.overrides + flags, check_files=False)
    gpus, source = plan_gpus(args, cfg)
    check_world(cfg, gpus)   # the launch must exist: sp divides the GPUs
    from lsp.plan.measure import GB, measure, modelled, report
    vocab_size = cfg.model.vocab_size or 257
    mcfg = hybrid_config(cfg, vocab_size)
    print(f"measuring for {gpus} GPUs: {source}", flush=True)
    got = measure(cfg, mcfg, gpus)
    print(report(cfg, gpus, got, modelled(cfg, mcfg, gpus)), flush=True)
    if got.peak > args.gpu_mem_gb * GB:
        raise UserError(f"--gpu-mem-gb {args.gpu_mem_gb:g}: the measured peak {got.peak / GB:.2f} GB per GPU "
                        "does not fit")
    return 0


CONFIG_HELP = "a run config YAML (configs/*.yaml; schema: docs/training.md)"
OVERRIDES_HELP = "key=value overrides of the config, e.g. train.steps=100 parallel.sp=2 (dotted keys)"
OVERRIDES_EPILOG = ("Every config key can be overridden as key=value after the config file; options may come "
                    "anywhere after the command. Keys and their meaning: docs/training.md.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lsp", description="Exact sequence-parallel training of hybrid linear/softmax LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train (one process, or one rank under torchrun)",
                       description="Train one process, or one rank under torchrun / accelerate launch.",
                       epilog=OVERRIDES_EPILOG)
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("launch", help="start torchrun with `lsp train` on every rank",
                       description="Run torchrun's elastic agent in this process, `lsp train CONFIG` on every rank "
                                   "(the config is checked once, before any rank starts).", epilog=OVERRIDES_EPILOG)
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks (GPUs, or CPU processes) on this node "
                   "(default 1); dp x sp must equal nproc-per-node x nnodes")
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default 1; > 1 needs --rdzv-endpoint)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1 (multi-node)")
    p.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of the rendezvous on node 0 (multi-node)")
    p.add_argument("--rdzv-id", default="", help="job id shared by the nodes of one job (multi-node, optional)")
    p.add_argument("--max-restarts", type=int, default=0, help="restart every rank up to K times when one fails; "
                   "they resume from the newest checkpoint (default 0)")
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_launch)
    p = sub.add_parser("eval", help="evaluate a checkpoint (MQAR accuracy / validation loss, or held-out files)")
    p.add_argument("checkpoint", help="a run directory, its checkpoints/ folder or one step_N folder")
    p.add_argument("--files", nargs="+", default=None, help="held-out text / .jsonl files: loss and perplexity")
    p.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("generate", help="continue a prompt with a trained run's model")
    p.add_argument("run_dir", help="a run directory (its newest complete checkpoint is used)")
    p.add_argument("--prompt", required=True, help="text (token ids separated by spaces for an MQAR run)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="sample within the top probability mass P (nucleus)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("export", help="write a run's model as a Hugging Face folder")
    p.add_argument("run_dir", help="a run directory (its newest complete checkpoint is exported)")
    p.add_argument("out_dir", help="the folder to write (created; an earlier export's weights in it are replaced)")
    p.add_argument("--max-shard-mb", type=float, default=5120.0, help="split the weights above this size")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("plan", help="recommend sp size, SP method, micro-batch for a config on a cluster")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs in the job (default: the config's launch, parallel.dp x parallel.sp, dp=0 as 1)")
    p.add_argument("--world", type=int, default=None, help="fix the SP size instead of searching it")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: data.seq_len)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node: NVLink inside, network across "
                   "(default 8)")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU in GB (default 80)")
    p.add_argument("--tflops", type=float, default=400.0, help="sustained bf16 TFLOP/s per GPU")
    p.add_argument("--top", type=int, default=10, help="candidates to print")
    p.add_argument("--measure", action="store_true",
                   help="run one step of the launch on fake tensors and compare with the model")
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
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
        from lsp.run_config import did_you_mean
        raise UserError(f"lsp: unknown command {argv[0]!r} (one of {', '.join(parser.commands)})"
                        + did_you_mean(argv[0], parser.commands))
    return parser.parse_args(argv)   # no subcommand, or -h: argparse's own answer


def main(argv: Optional[List[str]] = None) -> int:
    from lsp.run_config import ConfigError
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
