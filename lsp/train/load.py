"""Open a finished (or running) training run for inference: `model, tokenizer = load_run(RUN_DIR)`, and measure its
perplexity on held-out text files (`heldout_perplexity`, behind `lsp eval RUN_DIR --files ...`), and start a new
training run from trained weights (`init_weights_from`, the config key `init_from`).

The model is rebuilt from the run's saved `config.yaml` and its weights are read from the newest complete checkpoint
in one process, whatever wrote it: DDP or FSDP (DCP shards, any dp x sp: DCP stores global shapes) or DeepSpeed
(any ZeRO stage, merged by DeepSpeed's zero_to_fp32). The tokenizer is the run's own: the byte tokenizer, its
`tokenizers` JSON, or, for the built-in MQAR task, token ids written as text.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Tuple

import torch

from lsp.run_config import Config, ConfigError, load_config

from .checkpoint import find_checkpoint, load_model_state
from .documents import iter_documents
from .mqar import MQAR
from .runs import require_intact
from .tokenizer import IdTokenizer, make_tokenizer


def run_tokenizer(cfg: Config):
    """The tokenizer the run trained with (encode / decode / vocab_size / eos_id)."""
    if cfg.data.kind == "mqar":
        return IdTokenizer(MQAR(cfg.data, cfg.train.seed).vocab_size)
    return make_tokenizer(cfg.data.tokenizer)


def load_run(run_dir: str, device="cpu", dtype: torch.dtype = torch.float32) -> Tuple[torch.nn.Module, object]:
    """(HybridLM in eval mode on `device`, tokenizer) of the newest complete checkpoint under run_dir (a run
    directory, its checkpoints/ folder or one step_N folder). Raises ValueError naming run_dir when none exists."""
    from lsp.models.build import build_model
    path = find_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    if path is None:
        raise ValueError(f"run_dir: no complete checkpoint found under {run_dir}")
    require_intact(path)   # one line naming the damaged file, not a loader's traceback
    # the run's data files need not exist any more: only the model shape and the tokenizer are read
    cfg = load_config(os.path.join(path, "config.yaml"), check_files=False)
    tokenizer = run_tokenizer(cfg)
    model = build_model(cfg, tokenizer.vocab_size)
    load_model_state(path, model)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


@torch.no_grad()
def heldout_perplexity(model, tokenizer, paths: List[str], seq_len: int) -> Dict[str, float]:
    """Next-token cross-entropy and perplexity exp(loss) over every token of the files.

    Each document (a text file, or a .jsonl line) is tokenised as in training, eos appended, and cut into
    non-overlapping windows of seq_len + 1 tokens (the context length of training); every token after the first of
    its document is predicted once, from at most seq_len previous tokens of that document.
    """
    if tokenizer.eos_id is None:
        raise ValueError("files: this run trained on MQAR token ids; held-out text needs a text run")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for text in iter_documents(paths):
        ids = tokenizer.encode(text) + [tokenizer.eos_id]
        for start in range(0, len(ids) - 1, seq_len):
            window = torch.tensor(ids[start:start + seq_len + 1], device=device)[None]   # [1, <= seq_len + 1]
            out = model(window[:, :-1], labels=window[:, 1:])
            nll += out.loss.double().item() * out.num_tokens.item()
            count += out.num_tokens.item()
    if count == 0:
        raise ValueError("files: no tokens to evaluate")
    return {"heldout_loss": nll / count, "heldout_perplexity": math.exp(nll / count), "heldout_tokens": count}


# the fields that decide what a HybridLM computes (the rest are training switches: backend, checkpointing, ...)
# (position_kinds: the kind of every layer, so that a mix in layer_pattern is compared position by position)
MODEL_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "num_v_heads",
                "position_kinds", "linear_attn", "head_dim", "intermediate_size", "rope_theta", "norm_eps",
                "tie_embeddings", "gate_low_rank_dim", "gate_logit_normalizer", "delta_conv_size", "ssm_state_size",
                "ssm_groups")


def init_weights_from(model, path: str) -> None:
    """`init_from=PATH`: copy into model the weights of an `lsp export` folder (config.json + safetensors) or of the
    newest checkpoint of a run. The saved model must compute the same function: ConfigError naming init_from and
    the first differing field otherwise."""
    from lsp.models import HybridConfig
    from lsp.models.hf import read_hf_folder
    if os.path.isfile(os.path.join(path, "config.json")):
        try:
            config, tensors = read_hf_folder(path)
        except ValueError as err:
            raise ConfigError("init_from", str(err)) from None
        saved_cfg = HybridConfig.from_dict(config)
    elif os.path.isdir(path) and find_checkpoint(path) is not None:
        try:
            saved = load_run(path)[0]
        except ValueError as err:   # a damaged checkpoint
            raise ConfigError("init_from", str(err)) from None
        saved_cfg, tensors = saved.cfg, saved.state_dict()
    else:
        raise ConfigError("init_from", f"{path} is neither an `lsp export` folder nor a run with a complete checkpoint")
    for name in MODEL_FIELDS:
        if getattr(saved_cfg, name) != getattr(model.cfg, name):
            raise ConfigError("init_from", f"{path} holds a model with {name}={getattr(saved_cfg, name)!r}; this "
                              f"config builds {name}={getattr(model.cfg, name)!r}")
    model.load_state_dict(tensors, strict=True)
