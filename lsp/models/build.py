"""What a run config makes of the model: the `HybridLM` of its `model:` section and the AdamW that trains it.

Beside the model (not in lsp.train) so that the trainer, `lsp.train.load` and the planner's `--measure` build the same
model and optimizer from one place without the planner importing the trainer (docs/architecture.md, layering).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lsp.hybrid_config import HybridConfigError
from lsp.run_config import Config, ConfigError, hybrid_config

from .model import HybridLM


def build_model(cfg: Config, vocab_size: int) -> HybridLM:
    """The run's model; vocab_size: the data's, used when model.vocab_size is 0. A combination of valid keys that
    a layer kind cannot run (e.g. model.num_v_heads on a decay kind: the kinds are torch classes, so the torch-free
    config check cannot ask them) is a one-line ConfigError naming the key, as the config's own errors."""
    mcfg = hybrid_config(cfg, vocab_size)
    try:
        return HybridLM(mcfg)
    except HybridConfigError as err:
        raise ConfigError(f"model.{err.key}", err.detail_for("model.")) from None


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW; no weight decay on 1-D parameters (norm weights, biases, gates)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             foreach=False)   # the per-parameter loop is bitwise reproducible across resumes
