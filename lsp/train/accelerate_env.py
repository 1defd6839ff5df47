"""`accelerate launch ... -m lsp.cli train CONFIG.yaml`: accelerate starts the ranks (torchrun underneath) and hands
its flags to them as ACCELERATE_* environment variables. lsp does its own DDP / FSDP / DeepSpeed wrapping and
autocast, so each flag is either honoured through the lsp config or refused with one line, never ignored:

    --mixed_precision bf16      train.precision auto -> bf16 (fp32 in the config: refused as a conflict)
    --mixed_precision no        accelerate's default: the lsp config decides
    --mixed_precision fp16|fp8  refused: lsp trains in bf16 or fp32
    --cpu / --use_cpu           train.device auto -> cpu (cuda in the config: refused)
    --use_fsdp / --use_deepspeed  must match parallel.engine (set fsdp / deepspeed and parallel.zero there)
    --dynamo_backend X, Megatron-LM  refused: lsp does not compile or wrap the model that way
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from lsp.run_config import Config, ConfigError


def _on(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").strip().lower() in ("1", "true", "yes")


def apply_accelerate_env(cfg: Config, env: Optional[Mapping[str, str]] = None) -> None:
    """Fold `accelerate launch` flags into cfg in place, or raise ConfigError naming the conflicting key."""
    env = os.environ if env is None else env
    if not any(name.startswith("ACCELERATE_") for name in env):
        return
    _precision(cfg, env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower())
    _device(cfg, _on(env, "ACCELERATE_USE_CPU"))
    for flag, engine in (("ACCELERATE_USE_FSDP", "fsdp"), ("ACCELERATE_USE_DEEPSPEED", "deepspeed")):
        if _on(env, flag) and cfg.parallel.engine != engine:
            raise ConfigError("parallel.engine", f"{cfg.parallel.engine} conflicts with accelerate launch "
                              f"--use_{engine}; lsp wraps the model itself: set parallel.engine={engine} "
                              "(and parallel.zero), or drop the flag")
    if _on(env, "ACCELERATE_USE_MEGATRON_LM"):
        raise ConfigError("parallel.engine", "accelerate launch --use_megatron_lm is not supported by lsp")
    if env.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower() not in ("no", ""):
        raise ConfigError("train", f"accelerate launch --dynamo_backend {env['ACCELERATE_DYNAMO_BACKEND']}: lsp does "
                          "not torch.compile the model; drop the flag")


def _precision(cfg: Config, mixed: str) -> None:
    want = cfg.train.precision
    if mixed == "no":
        return
    if mixed != "bf16":
        raise ConfigError("train.precision", f"accelerate launch --mixed_precision {mixed} is not supported: lsp "
                          "trains in bf16 (--mixed_precision bf16 or train.precision=bf16) or fp32")
    if want == "fp32":
        raise ConfigError("train.precision", "fp32 conflicts with accelerate launch --mixed_precision bf16; "
                          "drop one of them")
    cfg.train.precision = "bf16"


def _device(cfg: Config, use_cpu: bool) -> None:
    if not use_cpu:
        return
    if cfg.train.device == "cuda":
        raise ConfigError("train.device", "cuda conflicts with accelerate launch --cpu; drop one of them")
    cfg.train.device = "cpu"
