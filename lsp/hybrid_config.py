"""`HybridConfig`: every hyper-parameter of a hybrid linear/softmax attention LM, validated on construction.

The one model schema: the run config's `model:` section is derived from its fields (lsp/run_config.py), so every
field below is a config key `model.<field>` and its errors name that key. Torch-free and outside `lsp.models`
(whose package imports torch) so that a config is checked before torch is imported; `lsp.models.HybridConfig` and
`lsp.models.config` re-export it.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

from lsp.kinds import kind_names
from lsp.names import KERNEL_BACKENDS as LINEAR_BACKENDS
from lsp.names import MOE_ROUTERS

SOFTMAX = "softmax"   # the layer_pattern entry of a softmax layer, beside the letter S

POSITIVE_INTS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ce_chunk_size", "gate_low_rank_dim",
                 "delta_conv_size", "ssm_state_size", "ssm_groups")
POSITIVE_NUMBERS = ("rope_theta", "norm_eps", "gate_logit_normalizer", "initializer_range")


class HybridConfigError(ValueError):
    """A bad HybridConfig value. `key` is the offending field; `detail` writes any other field it names as
    `{p}name`, so that the run config can say `model.name` (`detail_for("model.")`) and the library says `name`."""

    def __init__(self, key: str, detail: str, choices: tuple = ()):
        self.key, self.detail, self.choices = key, detail, tuple(choices)
        sep = " " if detail.startswith("must") else ": "   # "head_dim must be ...", "num_kv_heads: 3 does not ..."
        super().__init__(f"{key}{sep}{self.detail_for('')}")

    def detail_for(self, prefix: str) -> str:
        return self.detail.replace("{p}", prefix)


def default_intermediate_size(hidden_size: int) -> int:
    """SwiGLU width: about 8/3 * hidden (same parameter count as a 4x GELU MLP), rounded up to a multiple of 64."""
    return -(-(8 * hidden_size) // (3 * 64)) * 64


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class HybridConfig:
    """Shape and training switches of `HybridLM`.

    layer_pattern: letters `L` (linear attention of kind `linear_attn`) / `S` (softmax attention), e.g. `LLLS`, or a
    comma-separated list whose entries are `L`, `S` / `softmax` or a registered linear kind, e.g. `kda,kda,kda,S`
    or `mamba2,gla,softmax` (a mix of kinds); repeated to num_layers.
    Labels passed to the model are aligned with input_ids (see `HybridLM.forward`).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None          # softmax layers only (GQA); None = num_heads
    num_v_heads: int | None = None           # delta kinds: value heads HV = G·num_heads (grouped); None = num_heads
    layer_pattern: str = "LLLS"
    linear_attn: str = "gla"                 # a registered kind: lsp.models.layer_kinds() (lsp/models/kinds/)
    head_dim: int | None = None              # None = hidden_size // num_heads
    intermediate_size: int | None = None     # None = default_intermediate_size(hidden_size)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    gate_low_rank_dim: int = 16              # GLA: rank of the per-key decay projection W2 W1
    gate_logit_normalizer: float = 16.0      # GLA: g = logsigmoid(.) / normalizer
    delta_conv_size: int = 4                 # deltanet / gated_deltanet: kernel of the short causal conv on q, k, v
    ssm_state_size: int = 64                 # mamba2: state size N per head (the key dim of its recurrence)
    ssm_groups: int = 1                      # mamba2: groups of heads sharing B and C (divides num_heads)
    linear_backend: str = "auto"             # kernel backend of lsp.ops.linear_attention / delta_rule
    ce_chunk_size: int = 4096                # tokens per cross-entropy chunk
    activation_checkpointing: bool = False   # recompute each block in backward
    initializer_range: float = 0.02
    # mixture of experts (docs/moe.md); moe_experts 0 = dense SwiGLU feed-forwards everywhere
    moe_experts: int = 0                     # routed experts per MoE block
    moe_top_k: int = 2                       # experts per token
    moe_shared_experts: int = 0              # always-on experts (one SwiGLU of moe_shared_experts x the expert width)
    moe_intermediate_size: int | None = None  # width of one expert; None = intermediate_size
    moe_first_dense: int = 0                 # dense blocks before the first MoE block
    moe_router: str = "softmax"              # softmax | sigmoid (DeepSeek-V3); top-k weights normalised to sum 1
    moe_aux_loss_coef: float = 0.0           # load-balancing loss E * sum_e f_e P_e (Switch / GShard)
    moe_bias_update_rate: float = 0.0        # aux-loss-free balancing: per-expert selection bias step (DeepSeek-V3)
    moe_z_loss_coef: float = 0.0             # router z-loss mean(logsumexp(logits)^2) (ST-MoE)
    moe_capacity_factor: float | None = None  # None = dropless; else slots per expert = ceil(cf * N * k / E)

    def __post_init__(self):
        for name in POSITIVE_INTS:
            if not _is_int(value := getattr(self, name)) or value <= 0:
                raise HybridConfigError(name, f"must be a positive int, got {value!r}")
        for name in POSITIVE_NUMBERS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise HybridConfigError(name, f"must be a positive number, got {value!r}")
        self._check_names()
        self._fill_shapes()
        self._check_moe()

    def _check_names(self) -> None:
        for name, choices in (("linear_attn", kind_names()), ("linear_backend", LINEAR_BACKENDS)):
            if (value := getattr(self, name)) not in choices:
                raise HybridConfigError(name, f"{value!r} is not one of {', '.join(choices)}", choices)
        choices = ("L", "S", SOFTMAX) + kind_names()
        if not isinstance(self.layer_pattern, str) or not self.layer_pattern.strip(" ,"):
            raise HybridConfigError("layer_pattern", f"{self.layer_pattern!r} must be a non-empty string of L and S "
                                    "(L linear, S softmax attention) or a comma-separated list of kinds", choices)
        for i, entry in enumerate(self.pattern_entries()):
            if entry not in choices:
                raise HybridConfigError("layer_pattern", f"{entry!r} (entry {i} of {self.layer_pattern!r}) is not one "
                                        f"of {', '.join(choices)}", choices)

    def pattern_entries(self) -> list:
        """The entries of layer_pattern: its letters (`LLLS`) or its comma-separated names (`kda,kda,S`)."""
        if "," in self.layer_pattern or self.layer_pattern in (SOFTMAX, *kind_names()):
            return [e.strip() for e in self.layer_pattern.split(",")]
        return list(self.layer_pattern)

    def _fill_shapes(self) -> None:
        """Resolve the None defaults (head_dim, num_kv_heads, intermediate_size) and check that the heads fit."""
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise HybridConfigError("num_heads", f"{self.num_heads} does not divide {{p}}hidden_size="
                                        f"{self.hidden_size}")
            self.head_dim = self.hidden_size // self.num_heads
        if not _is_int(self.head_dim) or self.head_dim <= 0 or self.head_dim % 2:
            raise HybridConfigError("head_dim", f"must be a positive even int (RoPE rotates pairs), got "
                                    f"{self.head_dim!r}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if not _is_int(self.num_kv_heads) or self.num_kv_heads <= 0:
            raise HybridConfigError("num_kv_heads", f"must be a positive int, got {self.num_kv_heads!r}")
        if self.num_heads % self.num_kv_heads:
            raise HybridConfigError("num_kv_heads", f"{self.num_kv_heads} does not divide {{p}}num_heads="
                                    f"{self.num_heads}")
        if self.num_heads % self.ssm_groups:
            raise HybridConfigError("ssm_groups", f"{self.ssm_groups} does not divide {{p}}num_heads={self.num_heads}")
        if self.num_v_heads is None:
            self.num_v_heads = self.num_heads
        if not _is_int(self.num_v_heads) or self.num_v_heads <= 0 or self.num_v_heads % self.num_heads:
            raise HybridConfigError("num_v_heads", f"must be a positive multiple of {{p}}num_heads={self.num_heads} "
                                    f"(value head j reads q/k head j // G), got {self.num_v_heads!r}")
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.hidden_size)
        if not _is_int(self.intermediate_size) or self.intermediate_size <= 0:
            raise HybridConfigError("intermediate_size", f"must be a positive int, got {self.intermediate_size!r}")

    def _check_moe(self) -> None:
        if not _is_int(self.moe_experts) or self.moe_experts < 0:
            raise HybridConfigError("moe_experts", f"must be an int >= 0 (0 = dense), got {self.moe_experts!r}")
        for name in ("moe_shared_experts", "moe_first_dense"):
            if not _is_int(value := getattr(self, name)) or value < 0:
                raise HybridConfigError(name, f"must be an int >= 0, got {value!r}")
        for name in ("moe_aux_loss_coef", "moe_bias_update_rate", "moe_z_loss_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise HybridConfigError(name, f"must be a number >= 0, got {value!r}")
        if self.moe_router not in MOE_ROUTERS:
            raise HybridConfigError("moe_router", f"{self.moe_router!r} is not one of {', '.join(MOE_ROUTERS)}",
                                    MOE_ROUTERS)
        cf = self.moe_capacity_factor
        if cf is not None and (not isinstance(cf, (int, float)) or isinstance(cf, bool) or cf <= 0):
            raise HybridConfigError("moe_capacity_factor", f"must be > 0 (or null for dropless), got {cf!r}")
        if not _is_int(self.moe_top_k) or self.moe_top_k <= 0:
            raise HybridConfigError("moe_top_k", f"must be a positive int, got {self.moe_top_k!r}")
        if self.moe_experts and self.moe_top_k > self.moe_experts:
            raise HybridConfigError("moe_top_k", f"{self.moe_top_k} > {{p}}moe_experts={self.moe_experts}")
        if self.moe_first_dense > self.num_layers:
            raise HybridConfigError("moe_first_dense", f"{self.moe_first_dense} > {{p}}num_layers={self.num_layers}")
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if not _is_int(self.moe_intermediate_size) or self.moe_intermediate_size <= 0:
            raise HybridConfigError("moe_intermediate_size", f"must be a positive int, got "
                                    f"{self.moe_intermediate_size!r}")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block `layer_idx` has a mixture-of-experts feed-forward (after moe_first_dense dense blocks)."""
        return self.moe_experts > 0 and layer_idx >= self.moe_first_dense

    @property
    def position_kinds(self) -> tuple:
        """The pattern repeated to num_layers, one entry per layer: a linear kind's name (`L` resolved to
        linear_attn) or None for a softmax layer, e.g. ('gla', 'gla', 'gla', None)."""
        entries = self.pattern_entries()
        reps = -(-self.num_layers // len(entries))
        resolve = {"L": self.linear_attn, "S": None, SOFTMAX: None}
        return tuple(resolve.get(e, e) for e in (entries * reps)[: self.num_layers])

    @property
    def layer_types(self) -> str:
        """One letter per layer, L linear (of any kind) or S softmax, e.g. 'LLLSLLLS'."""
        return "".join("S" if kind is None else "L" for kind in self.position_kinds)

    def linear_kind_counts(self) -> dict:
        """{linear kind: number of layers of it}, in order of first appearance (what the formulas sum over)."""
        counts: dict = {}
        for kind in self.position_kinds:
            if kind is not None:
                counts[kind] = counts.get(kind, 0) + 1
        return counts

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
