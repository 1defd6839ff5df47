"""Hybrid linear/softmax attention language model."""
from .config import HybridConfig
from .flops import flops_per_token, matmul_parameters, num_parameters
from .loss import chunked_cross_entropy
from .model import HybridLM, LMOutput

__all__ = ["HybridConfig", "HybridLM", "LMOutput", "chunked_cross_entropy", "flops_per_token", "matmul_parameters",
           "num_parameters"]
