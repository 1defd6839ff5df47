"""`HybridConfig`, the model schema; defined torch-free in lsp/hybrid_config.py (the run config derives from it)."""
from lsp.hybrid_config import HybridConfig, HybridConfigError, default_intermediate_size

__all__ = ["HybridConfig", "HybridConfigError", "default_intermediate_size"]
