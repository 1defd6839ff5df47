"""Hybrid linear/softmax attention language model."""
from .cache import DecodeCache, KVCache, RecurrentState
from .config import HybridConfig
from .flops import flops_per_token, matmul_parameters, num_parameters
from .generate import generate
from .linear_kind import LinearKind, Recurrence, layer_kind, layer_kinds, register_kind
from .loss import chunked_cross_entropy
from .model import HybridLM, LMOutput


def load_run(run_dir, device="cpu", dtype=None):
    """`model, tokenizer = load_run(RUN_DIR)`: the trained model of a run directory (any checkpoint kind, one
    process) and its tokenizer. Reading a run needs its config schema, so the work is in `lsp.train.load`."""
    import torch

    from lsp.train.load import load_run as _load_run
    return _load_run(run_dir, device=device, dtype=dtype or torch.float32)


__all__ = ["DecodeCache", "HybridConfig", "HybridLM", "KVCache", "LMOutput", "LinearKind", "RecurrentState",
           "Recurrence", "chunked_cross_entropy", "flops_per_token", "generate", "layer_kind", "layer_kinds",
           "load_run", "matmul_parameters", "num_parameters", "register_kind"]
