"""Config-driven training: schema (config), data (MQAR, packed files), dp x sp mesh (dist), engines (DDP / FSDP2 /
DeepSpeed), atomic DCP checkpoints, logging and the train loop (trainer). See docs/training.md.

Only the torch-free config names are imported here, so `lsp` rejects a bad config before torch is loaded.
"""
from .config import Config, ConfigError, load_config, validate

__all__ = ["Config", "ConfigError", "load_config", "validate"]
