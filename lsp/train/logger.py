"""Rank-0 run logging: JSONL metrics file, tqdm bar, optional wandb (offline by default), loss-curve PNG."""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

import torch

from lsp.run_config import Config, to_dict

from .files import write_text_atomic
from .runs import make_run_dir, wandb_run_id

# dense bf16 peak TFLOP/s per device, for MFU when logging.peak_tflops is 0
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def peak_flops(cfg: Config, device: torch.device) -> Optional[float]:
    """Peak FLOP/s of one device (None when unknown, e.g. on CPU: then no MFU is reported)."""
    if cfg.logging.peak_tflops > 0:
        return cfg.logging.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports KiB


def _drop_rows_after(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomic(path, "".join(rows))


def json_safe(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """NaN / inf (a skipped non-finite step) become null: metrics.jsonl stays strict JSON (jq, pandas, JS)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def start_wandb(cfg: Config):
    """wandb run of this run dir (its id is kept there, so a resumed job continues the same wandb run), or None."""
    try:
        import wandb
        run_id = wandb_run_id(cfg.run_dir)
        return wandb.init(project=cfg.logging.wandb_project, name=cfg.name, dir=cfg.run_dir, id=run_id,
                          mode=cfg.logging.wandb_mode, config=to_dict(cfg), resume="allow")
    except Exception as err:   # logging must never stop training
        print(f"warning: wandb disabled ({type(err).__name__}: {err})", file=sys.stderr)
        return None


def duration(seconds: float) -> str:
    """12s, 3m04s, 2h05m: a console time span."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


class RunLogger:
    """Writes only on the main rank; every method is a no-op elsewhere."""

    def __init__(self, cfg: Config, active: bool, total_steps: int, start_step: int):
        self.cfg, self.active = cfg, active
        self.total_steps, self.start_step, self.started = total_steps, start_step, time.monotonic()
        self.history: List[Dict[str, Any]] = []
        self.bar = self.wandb = None
        if not active:
            return
        make_run_dir(cfg.run_dir)
        path = os.path.join(cfg.run_dir, "metrics.jsonl")
        _drop_rows_after(path, start_step)   # a resumed run re-logs the steps after its checkpoint
        self.jsonl = open(path, "a")
        self.postfix: Dict[str, str] = {}
        if cfg.logging.tqdm and sys.stderr.isatty():   # a log file gets plain lines, not thousands of \r updates
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, file=sys.stderr)
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            self.wandb = start_wandb(cfg)

    def log(self, metrics: Dict[str, Any]) -> None:
        """One row: metrics.jsonl (with its wall-clock `time`, UTC, and `elapsed_s` since this process started
        training), wandb (which keeps its own clock), and the bar or, in a log file, a plain line ending in the
        elapsed time and an ETA (the remaining steps at this process's mean pace so far)."""
        if not self.active:
            return
        elapsed = time.monotonic() - self.started
        row = {**metrics, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "elapsed_s": round(elapsed, 3)}
        self.history.append(row)
        self.jsonl.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=metrics["step"])
        if self.bar is not None:   # tqdm shows its own elapsed time and ETA
            self.bar.set_postfix(self.bar_fields(metrics))
        else:
            fields = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
            done = metrics["step"] - self.start_step
            eta = elapsed * (self.total_steps - metrics["step"]) / done if done > 0 else None
            fields += [f"elapsed={duration(elapsed)}"] + ([f"eta={duration(eta)}"] if eta is not None else [])
            print(" ".join(fields), file=sys.stderr, flush=True)

    def bar_fields(self, metrics: Dict[str, Any]) -> Dict[str, str]:
        """The bar's postfix: latest train loss and tokens/s, and the latest eval results, kept between updates."""
        short = {"loss": "loss", "tokens_per_s": "tok_s", "eval_loss": "eval_loss", "eval_accuracy": "eval_acc"}
        for key, name in short.items():
            if isinstance(metrics.get(key), float):
                self.postfix[name] = f"{metrics[key]:.0f}" if key == "tokens_per_s" else f"{metrics[key]:.4f}"
        return self.postfix

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self, exit_code: int = 0) -> None:
        """Finish the run's outputs. A failing run (exit_code != 0) closes them before its error is printed, so
        wandb's closing lines never follow the error line or the traceback; it writes no plot."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.cfg.logging.plot and exit_code == 0:
            self.plot()
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)

    def plot(self) -> None:
        """loss_curve.png in the run dir from the whole metrics.jsonl (so resumed runs plot the full curve)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        with open(os.path.join(self.cfg.run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]   # null = non-finite
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        if train:
            ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(self.cfg.name)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.cfg.run_dir, "loss_curve.png"), dpi=100)
        plt.close(fig)
        self.plot_moe_load(rows, plt)

    def plot_moe_load(self, rows, plt) -> None:
        """moe_load.png: per MoE layer, the expert load max / mean over the steps (1 = perfectly balanced)."""
        keys = sorted({k for r in rows for k in r if k.startswith("moe/") and k.endswith("/load_max_over_mean")},
                      key=lambda k: int(k.split("/")[1]) if k.split("/")[1].isdigit() else 0)
        if not keys:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            ax.plot(*zip(*[(r["step"], r[key]) for r in rows if key in r]), label=f"layer {key.split('/')[1]}")
        ax.set_xlabel("step")
        ax.set_ylabel("expert load max / mean")
        ax.set_title(f"{self.cfg.name}: MoE load balance")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.cfg.run_dir, "moe_load.png"), dpi=100)
        plt.close(fig)
