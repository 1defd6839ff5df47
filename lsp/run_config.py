"""Typed run configuration: a dataclass schema, loaded with omegaconf from YAML plus `key=value` overrides.

Every user mistake (unknown key, wrong type, value out of range, impossible combination) raises `ConfigError`
with one line that names the key; the CLI prints it and exits with code 2.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lsp.engines import engine_names, engine_spec
from lsp.hybrid_config import HybridConfig, HybridConfigError
from lsp.names import DEFAULT_SOFTMAX_METHOD, DEFAULT_SP_METHOD, LAYOUTS, SAVE_SIGNALS, SOFTMAX_SP_METHODS, SP_METHODS


class ConfigError(ValueError):
    """A user error in the run configuration; str() is one line naming the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


# The `model:` section is HybridConfig itself (lsp/hybrid_config.py: one definition of every model key, its type and
# its default), less the fields another section sets. HybridConfig has no default for the shape keys; a run without
# a `model:` section trains this tiny CPU model, and vocab_size 0 takes the vocabulary from the data.
RUN_MODEL_DEFAULTS = dict(vocab_size=0, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, layer_pattern="LS")
SET_ELSEWHERE = ("activation_checkpointing",)   # a train.* key


def _model_section():
    """The dataclass of the `model:` section, derived from `HybridConfig`'s fields (torch-free import)."""
    types = typing.get_type_hints(HybridConfig)
    spec = [(f.name, types[f.name], field(default=RUN_MODEL_DEFAULTS.get(f.name, f.default)))
            for f in dataclasses.fields(HybridConfig) if f.name not in SET_ELSEWHERE]
    section = dataclasses.make_dataclass("ModelConfig", spec)
    section.__module__ = __name__
    return section


ModelConfig = _model_section()


@dataclass
class MQARConfig:
    num_kv_pairs: int = 8
    num_queries: int = 8
    num_keys: int = 32
    num_values: int = 32


@dataclass
class HFDataConfig:
    """data.kind=hf: a Hugging Face `datasets` corpus (optional extra: pip install 'lsp-hybrid[datasets]')."""
    path: str = ""  # a save_to_disk directory, or a builder (json | csv | parquet | text | arrow) with data_files
    data_files: List[str] = field(default_factory=list)
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False  # read as an IterableDataset (rank 0 tokenises the stream, the others wait)


@dataclass
class DataConfig:
    kind: str = "mqar"  # mqar | files | hf
    seq_len: int = 128
    mqar: MQARConfig = field(default_factory=MQARConfig)
    files: List[str] = field(default_factory=list)  # .txt / .jsonl (field "text")
    hf: HFDataConfig = field(default_factory=HFDataConfig)
    tokenizer: str = "byte"  # "byte" or a path to a HF tokenizers JSON file
    cache_dir: str = ".cache/lsp-data"
    val_fraction: float = 0.05
    eval_batches: int = 4


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 10


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch: int = 8
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 disables
    seed: int = 0
    eval_every: int = 0  # 0 = only at the end
    log_every: int = 10
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda
    on_nonfinite: str = "stop"  # NaN/inf loss or gradient on any rank: stop (exit 3) | skip (no update, counted)


@dataclass
class ParallelConfig:
    dp: int = 0  # 0 = world_size // sp
    sp: int = 1
    sp_method: str = DEFAULT_SP_METHOD
    scan_blocks: int = 4  # All-Scan pipeline blocks along V (sp_method=allscan)
    softmax_method: str = DEFAULT_SOFTMAX_METHOD  # softmax layers: allgather (LASP-2H) | ring (ring attention)
    layout: str = "zigzag"
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    engine: str = "ddp"  # a name of lsp.engines.engine_names(): ddp | fsdp | deepspeed
    zero: int = 0  # ZeRO stage 0-3 (ddp: 0; fsdp: 2 or 3; deepspeed: 0-3)
    ep: int = 1  # expert parallelism: MoE experts split over groups of ep ranks of the dp x sp mesh (docs/moe.md)


@dataclass
class CheckpointConfig:
    dir: str = ""  # "" = <run_dir>/checkpoints
    every: int = 0  # 0 = only at the end
    keep: int = 2
    resume: bool = True
    # these signals make every rank finish its step, save and exit 75 (lsp/train/signals.py); [] = die at once
    save_on_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    save_timeout_s: int = 120  # lsp launch: how long torchrun waits for that save before it kills the ranks


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "lsp"
    tqdm: bool = True
    plot: bool = True
    peak_tflops: float = 0.0  # per device, for MFU; 0 = detect (known GPUs) or skip


@dataclass
class Config:
    name: str = "run"
    out_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    init_from: str = ""  # "" = random init; an `lsp export` folder or a run directory to start from (lsp.train.load)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out_dir, self.name)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")


CHOICES = {
    "data.kind": ("mqar", "files", "hf"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.on_nonfinite": ("stop", "skip"),
    "parallel.sp_method": SP_METHODS,
    "parallel.softmax_method": SOFTMAX_SP_METHODS,
    "parallel.layout": LAYOUTS,
    "parallel.backend": ("auto", "gloo", "nccl"),
    "parallel.engine": engine_names(),
    "logging.wandb_mode": ("offline", "online", "disabled"),
}
POSITIVE = ("data.seq_len", "data.mqar.num_kv_pairs", "data.mqar.num_queries", "data.mqar.num_keys",
            "data.mqar.num_values", "data.eval_batches", "optim.lr", "train.steps", "train.micro_batch",
            "train.grad_accum", "train.log_every", "parallel.sp", "parallel.scan_blocks", "parallel.ep",
            "checkpoint.keep", "checkpoint.save_timeout_s")
NON_NEGATIVE = ("model.vocab_size", "optim.min_lr", "optim.eps", "optim.weight_decay", "optim.warmup_steps",
                "train.grad_clip", "train.seed", "train.eval_every", "parallel.dp", "checkpoint.every",
                "logging.peak_tflops")


def _get(cfg: Config, key: str) -> Any:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def schema_keys(schema=Config, prefix: str = "") -> List[str]:
    """Every dotted key of the schema, sections included: "train", "train.steps", ..."""
    keys = []
    for f in dataclasses.fields(schema):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += schema_keys(f.default_factory, f"{prefix}{f.name}.")
    return keys


def did_you_mean(word: str, choices) -> str:
    """ "; did you mean X?" for the closest choice (difflib ratio >= 0.6), else ""."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean {close[0]}?" if close else ""


def initials(name: str) -> str:
    """learning_rate -> lr, weight_decay -> wd: how a key is usually abbreviated."""
    return "".join(part[:1] for part in name.split("_"))


def closest_key(key: str, keys: List[str]) -> Optional[str]:
    """The schema key a mistyped dotted key most likely meant, or None. Within an existing section the last part is
    compared with that section's keys alone (an abbreviation either way first, then spelling), so the shared
    section prefix does not make a poor match look close (optim.learning_rate is optim.lr, not optim.min_lr); then
    the same name in another section (model.sp_method -> parallel.sp_method). A key whose section does not exist
    is compared whole (trian.steps -> train.steps)."""
    section, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == section}
    if section and section not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        return close[0] if close else None
    by_initials = [full for name, full in siblings.items() if initials(leaf) == name or initials(name) == leaf]
    close = difflib.get_close_matches(leaf, list(siblings), n=1)
    elsewhere = [k for k in keys if k.rpartition(".")[2] == leaf and k != key]
    return next(iter(by_initials + [siblings[c] for c in close] + elsewhere), None)


def unknown_key(key: str) -> ConfigError:
    match = closest_key(key, schema_keys())
    return ConfigError(key, "unknown key" + (f"; did you mean {match}?" if match else ""))


def file_problem(path: str) -> Optional[str]:
    """Why path cannot be read as an input file ("file not found: X", "X is a folder, not a file"), or None."""
    if os.path.isdir(path):
        return f"{path} is a folder, not a file (name the files in it)"
    return None if os.path.isfile(path) else f"file not found: {path}"


def dir_problem(path: str) -> Optional[str]:
    """Why the folder path cannot be created or written, or None; checked before anything is written. (os.access
    answers yes to root everywhere: what it misses fails at the first write, where the writer names the key.)"""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a folder" if probe == os.path.abspath(path) else \
            f"cannot create {path}: {probe} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"cannot write to {path}: {probe} is not writable"
    return None


def _omegaconf_error(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = str(getattr(err, "msg", None) or err).strip().splitlines()[0]
    if "not in" in msg and "Key" in msg:
        return unknown_key(key)
    if key and isinstance(OmegaConf.select(OmegaConf.structured(Config), key), ListConfig):
        return ConfigError(key, f"must be a list; write {key}=[...] (brackets, items separated by commas)")
    return ConfigError(key or "config", msg)


def _yaml_error(path: str, err: yaml.YAMLError) -> ConfigError:
    """`file:line:column: problem` (1-based, as editors count) for a YAML syntax error."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    context = getattr(err, "context", None)
    return ConfigError("config", f"{where}: {problem}" + (f" ({context})" if context else ""))


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None, check_files: bool = True) -> Config:
    """YAML file (optional) + `key=value` overrides -> validated `Config` (raises ConfigError)."""
    schema = OmegaConf.structured(Config)
    try:
        merged = schema
        if path is not None:
            if (problem := file_problem(path)) is not None:
                raise ConfigError("config", problem)
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as err:
                raise _yaml_error(path, err) from None
            if not isinstance(loaded, DictConfig):
                raise ConfigError("config", f"{path} must be a YAML mapping of sections (model:, data:, train:, ...)")
            merged = OmegaConf.merge(merged, lift_model_extra(loaded))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(item, "override must look like key=value")
            key = item.split("=", 1)[0]
            if OmegaConf.select(schema, key, default="__missing__") == "__missing__":
                raise unknown_key(key)
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err) from None
    except ConfigError:
        raise
    except Exception as err:  # YAML syntax errors and the like
        raise ConfigError("config", str(err).strip().splitlines()[0]) from None
    validate(cfg, check_files=check_files)
    return cfg


def validate(cfg: Config, world_size: Optional[int] = None, check_files: bool = True) -> None:
    """Reject values out of range and impossible combinations, one line naming the key."""
    for key, choices in CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(key, f"{_get(cfg, key)!r} is not one of {', '.join(choices)}"
                              + did_you_mean(_get(cfg, key), choices))
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(key, f"must be > 0, got {_get(cfg, key)}")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(key, f"must be >= 0, got {_get(cfg, key)}")
    hybrid_config(cfg, vocab_size=1)   # HybridConfig's own checks, named model.<key>
    d, o, p = cfg.data, cfg.optim, cfg.parallel
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError("optim.betas", f"{list(o.betas)} must be two numbers in [0, 1)")
    if o.min_lr > o.lr:
        raise ConfigError("optim.min_lr", f"{o.min_lr} is larger than optim.lr={o.lr}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError("data.val_fraction", f"{d.val_fraction} must be in [0, 1)")
    segments = p.sp * (2 if p.layout == "zigzag" else 1)
    if d.seq_len % segments:
        raise ConfigError("data.seq_len", f"{d.seq_len} is not divisible into {segments} whole segments "
                          f"(parallel.sp={p.sp}, layout={p.layout})")
    if d.kind == "mqar":
        q = d.mqar
        if q.num_kv_pairs > q.num_keys:
            raise ConfigError("data.mqar.num_kv_pairs", f"{q.num_kv_pairs} > data.mqar.num_keys={q.num_keys} "
                              "(keys must be distinct)")
        if 2 * q.num_kv_pairs + 2 * q.num_queries > d.seq_len:
            raise ConfigError("data.mqar.num_queries", f"{q.num_kv_pairs} pairs + {q.num_queries} queries need "
                              f"{2 * q.num_kv_pairs + 2 * q.num_queries} tokens > data.seq_len={d.seq_len}")
    else:
        if d.kind == "files" and not d.files:
            raise ConfigError("data.files", "data.kind=files needs at least one file")
        if d.kind == "hf" and not d.hf.path:
            raise ConfigError("data.hf.path", "data.kind=hf needs a save_to_disk directory or a builder name "
                              "(json, csv, parquet, text, arrow) with data.hf.data_files")
        key, files = ("data.files", d.files) if d.kind == "files" else ("data.hf.data_files", d.hf.data_files)
        for f in files if check_files else ():
            if (problem := file_problem(f)) is not None:
                raise ConfigError(key, problem)
        if check_files and d.tokenizer != "byte":
            _check_tokenizer_file(d.tokenizer)
    for key, folder in (("out_dir", cfg.run_dir), ("checkpoint.dir", cfg.checkpoint.dir)) if check_files else ():
        if folder and (problem := dir_problem(folder)) is not None:
            raise ConfigError(key, problem)
    if (name := next((n for n in cfg.checkpoint.save_on_signals if n not in SAVE_SIGNALS), None)) is not None:
        raise ConfigError("checkpoint.save_on_signals", f"{name!r} is not one of {', '.join(SAVE_SIGNALS)}")
    if (problem := engine_spec(p.engine).zero_problem(p.zero)) is not None:
        raise ConfigError("parallel.zero", problem)
    _check_ep(cfg)
    if world_size is not None:
        check_world(cfg, world_size)


def check_world(cfg: Config, world_size: int) -> None:
    """The launch fits the config: sp divides the world and dp x sp is all of it. The rest of the config was
    validated once, by load_config, in this process; this is what is left to check once the world size is known."""
    p = cfg.parallel
    if world_size % p.sp:
        raise ConfigError("parallel.sp", f"{p.sp} does not divide the world size {world_size} "
                          f"(start it with: lsp launch --nproc-per-node {p.sp} ...)")
    dp = p.dp or world_size // p.sp
    if dp * p.sp != world_size:
        raise ConfigError("parallel.dp", f"dp={dp} x sp={p.sp} != world size {world_size}")
    if world_size % p.ep:   # the EP groups are carved from the dp x sp ranks
        raise ConfigError("parallel.ep", f"{p.ep} does not divide the dp x sp ranks ({world_size})")


def _check_ep(cfg: Config) -> None:
    p, experts = cfg.parallel, cfg.model.moe_experts
    if p.ep == 1:
        return
    if not experts:
        raise ConfigError("parallel.ep", f"{p.ep} needs a mixture-of-experts model (model.moe_experts > 0)")
    if experts % p.ep:
        raise ConfigError("parallel.ep", f"{p.ep} does not divide model.moe_experts={experts}")
    if not engine_spec(p.engine).expert_parallel:
        with_ep = ", ".join(n for n in engine_names() if engine_spec(n).expert_parallel)
        raise ConfigError("parallel.ep", f"{p.ep} needs parallel.engine={with_ep} (expert parallelism with "
                          f"{p.engine} is not implemented)")


def lift_model_extra(loaded: DictConfig) -> DictConfig:
    """A config.yaml saved before `model.extra` was removed: its `model.extra: {k: v}` is read as `model.k: v`
    (checkpoints keep loading; a key that is not a HybridConfig field is still rejected by name)."""
    model = loaded.get("model")
    if not isinstance(model, DictConfig) or "extra" not in model:
        return loaded
    extra = model.pop("extra")
    if extra:
        loaded.model = OmegaConf.merge(model, extra)
    return loaded


def hybrid_config(cfg: Config, vocab_size: int) -> HybridConfig:
    """The `HybridConfig` of the `model:` section (+ train.activation_checkpointing), as the trainer and the planner
    (lsp.plan) build it; its errors become one-line ConfigErrors naming the key (`model.head_dim: ...`).
    vocab_size: the data's, used when model.vocab_size is 0 (validate passes 1: no data is read there)."""
    m = cfg.model
    if m.vocab_size and m.vocab_size < vocab_size:
        raise ConfigError("model.vocab_size", f"{m.vocab_size} is smaller than the data vocabulary {vocab_size}")
    kwargs = {**dataclasses.asdict(m), "vocab_size": m.vocab_size or vocab_size,
              "activation_checkpointing": cfg.train.activation_checkpointing}
    try:
        return HybridConfig(**kwargs)
    except HybridConfigError as err:
        hint = did_you_mean(getattr(m, err.key), err.choices) if err.choices else ""
        raise ConfigError(f"model.{err.key}", err.detail_for("model.") + hint) from None


def _check_tokenizer_file(path: str) -> None:
    """A tokenizers JSON must exist and parse, checked before anything is started or written."""
    if (problem := file_problem(path)) is not None:
        raise ConfigError("data.tokenizer", f"'byte' or a tokenizers JSON file; {problem}")
    try:
        with open(path, "rb") as f:
            spec = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError("data.tokenizer", f"{path} is not a tokenizers JSON file ({type(err).__name__}); "
                          "use data.tokenizer=byte or a tokenizer.json saved by `tokenizers`") from None
    if not isinstance(spec, dict) or "model" not in spec:
        raise ConfigError("data.tokenizer", f"{path} is JSON but not a tokenizers file (no \"model\" entry); "
                          "use data.tokenizer=byte or a tokenizer.json saved by `tokenizers`")
    if importlib.util.find_spec("tokenizers") is None:
        raise ConfigError("data.tokenizer", "a tokenizer JSON needs the `tokenizers` package "
                          "(pip install 'lsp-hybrid[tokenizers]'), or use data.tokenizer=byte")


def with_absolute_paths(cfg: Config) -> Config:
    """A copy of cfg whose local paths are absolute (data files, token cache, tokenizer JSON, a local `datasets`
    folder or its files, init_from): what a run saves with its checkpoints, so `lsp eval` / `generate` / `export`
    read the same data and tokenizer from any working directory. A builder name (data.hf.path=json) stays as it is."""
    out = copy.deepcopy(cfg)
    d = out.data
    d.files = [os.path.abspath(f) for f in d.files]
    d.cache_dir = os.path.abspath(d.cache_dir)
    if d.tokenizer != "byte":
        d.tokenizer = os.path.abspath(d.tokenizer)
    if os.path.isdir(d.hf.path):
        d.hf.path = os.path.abspath(d.hf.path)
    d.hf.data_files = [os.path.abspath(f) if os.path.exists(f) else f for f in d.hf.data_files]
    if out.init_from:
        out.init_from = os.path.abspath(out.init_from)
    return out


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)

