"""Config-driven training: schema (config), data (MQAR, packed files), dp x sp mesh (dist), engines (DDP / FSDP2 /
DeepSpeed), atomic DCP checkpoints, logging and the train loop (trainer). See docs/training.md.

Only the torch-free config names are imported here, so `lsp` rejects a bad config before torch is loaded.
"""
from lsp.run_config import Config, ConfigError, load_config, validate


def load_run(run_dir, device="cpu", dtype=None):
    """`model, tokenizer = load_run(RUN_DIR)`: the trained model of a run directory (any checkpoint kind, one
    process) and its tokenizer (lsp/train/load.py; imported here lazily, so `import lsp.train` stays torch-free)."""
    import torch

    from .load import load_run as _load_run
    return _load_run(run_dir, device=device, dtype=dtype or torch.float32)


__all__ = ["Config", "ConfigError", "load_config", "load_run", "validate"]
