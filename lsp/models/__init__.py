"""Hybrid linear/softmax attention language model."""
from .cache import DecodeCache, KVCache, RecurrentState
from .config import HybridConfig
from .flops import flops_per_token, matmul_parameters, num_parameters
from .generate import generate
from .loss import chunked_cross_entropy
from .model import HybridLM, LMOutput

__all__ = ["DecodeCache", "HybridConfig", "HybridLM", "KVCache", "LMOutput", "RecurrentState",
           "chunked_cross_entropy", "flops_per_token", "generate", "matmul_parameters",
           "num_parameters"]
