"""Hybrid linear/softmax attention language model."""
from .cache import DecodeCache, KVCache, RecurrentState
from .config import HybridConfig
from .flops import flops_per_token, matmul_parameters, num_parameters
from .generate import generate
from .linear_kind import LinearKind, Recurrence, layer_kind, layer_kinds, register_kind
from .loss import chunked_cross_entropy
from .model import HybridLM, LMOutput

__all__ = ["DecodeCache", "HybridConfig", "HybridLM", "KVCache", "LMOutput", "LinearKind", "RecurrentState",
           "Recurrence", "chunked_cross_entropy", "flops_per_token", "generate", "layer_kind", "layer_kinds",
           "matmul_parameters", "num_parameters", "register_kind"]
