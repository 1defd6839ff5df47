"""`HybridConfig`: every hyper-parameter of a hybrid linear/softmax attention LM, validated on construction."""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

from lsp.names import KERNEL_BACKENDS as LINEAR_BACKENDS
from lsp.names import LINEAR_VARIANTS as LINEAR_ATTN


def default_intermediate_size(hidden_size: int) -> int:
    """SwiGLU width: about 8/3 * hidden (same parameter count as a 4x GELU MLP), rounded up to a multiple of 64."""
    return -(-(8 * hidden_size) // (3 * 64)) * 64


@dataclass
class HybridConfig:
    """Shape and training switches of `HybridLM`.

    layer_pattern: letters `L` (linear attention) / `S` (softmax attention), repeated to num_layers.
    Labels passed to the model are aligned with input_ids (see `HybridLM.forward`).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None          # softmax layers only (GQA); None = num_heads
    layer_pattern: str = "LLLS"
    linear_attn: str = "gla"                 # linear | lightning | simple_gla | gla | deltanet | gated_deltanet
    head_dim: int | None = None              # None = hidden_size // num_heads
    intermediate_size: int | None = None     # None = default_intermediate_size(hidden_size)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    gate_low_rank_dim: int = 16              # GLA: rank of the per-key decay projection W2 W1
    gate_logit_normalizer: float = 16.0      # GLA: g = logsigmoid(.) / normalizer
    delta_conv_size: int = 4                 # deltanet / gated_deltanet: kernel of the short causal conv on q, k, v
    linear_backend: str = "auto"             # backend of lsp.ops.linear_attention
    ce_chunk_size: int = 4096                # tokens per cross-entropy chunk
    activation_checkpointing: bool = False   # recompute each block in backward
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ce_chunk_size", "gate_low_rank_dim",
                     "delta_conv_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if not isinstance(self.num_kv_heads, int) or self.num_kv_heads <= 0:
            raise ValueError(f"num_kv_heads must be a positive int, got {self.num_kv_heads!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads != 0:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
            self.head_dim = self.hidden_size // self.num_heads
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int (RoPE rotates pairs), got {self.head_dim!r}")
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.hidden_size)
        if not isinstance(self.intermediate_size, int) or self.intermediate_size <= 0:
            raise ValueError(f"intermediate_size must be a positive int, got {self.intermediate_size!r}")
        if not isinstance(self.layer_pattern, str) or not self.layer_pattern or set(self.layer_pattern) - {"L", "S"}:
            raise ValueError(f"layer_pattern must be a non-empty string of 'L' (linear) / 'S' (softmax), "
                             f"got {self.layer_pattern!r}")
        if self.linear_attn not in LINEAR_ATTN:
            raise ValueError(f"linear_attn must be one of {LINEAR_ATTN}, got {self.linear_attn!r}")
        if self.linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend must be one of {LINEAR_BACKENDS}, got {self.linear_backend!r}")
        for name in ("rope_theta", "norm_eps", "gate_logit_normalizer", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    @property
    def layer_types(self) -> str:
        """The pattern repeated to num_layers, one letter per layer, e.g. 'LLLSLLLS'."""
        reps = -(-self.num_layers // len(self.layer_pattern))
        return (self.layer_pattern * reps)[: self.num_layers]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HybridConfig":
        """Build from a plain dict; unknown keys raise one line naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown HybridConfig key(s): {', '.join(unknown)}")
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
        if missing:
            raise ValueError(f"missing HybridConfig key(s): {', '.join(missing)}")
        return cls(**d)
