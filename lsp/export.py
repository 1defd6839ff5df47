"""`lsp export RUN_DIR OUT_DIR`: a trained run as a Hugging Face model folder.

    OUT_DIR/config.json              model_type lsp_hybrid, auto_map -> modeling_lsp.py, lsp's HybridConfig as "lsp"
    OUT_DIR/modeling_lsp.py          remote code (lsp/models/hf/modeling_lsp.py): HybridLM behind PreTrainedModel
    OUT_DIR/model.safetensors        fp32 weights, lsp's names under "model."; above max_shard_bytes split into
                                     model-0000i-of-0000n.safetensors + model.safetensors.index.json
    OUT_DIR/README.md                how to load it (the tokenizer without remote code: PreTrainedTokenizerFast)
    OUT_DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                     the run's tokenizer as a `tokenizers` file with lsp's end-of-document id as
                                     the eos token (the byte tokenizer as a byte-level BPE without merges, whose id of
                                     byte b is b); none for MQAR runs (their tokens are ids)

Reading any checkpoint kind goes through `lsp.train.load.load_run`, so DDP / FSDP / DeepSpeed runs at any dp x sp
export the same model. Writing needs only safetensors (a base dependency); loading the folder needs
transformers and lsp (`pip install 'lsp-hybrid[hf]'`).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Dict, List

import torch

from lsp.models.hf import ARCHITECTURE, MODEL_TYPE, MODELING_FILE, PREFIX, read_hf_folder

EOS_TOKEN = "<|endoftext|>"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3


def export_run(run_dir: str, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> List[str]:
    """Write the newest checkpoint of run_dir as a Hugging Face folder; returns the names of the files written.
    A out_dir that cannot be a folder is a ValueError naming it, raised before the run is read."""
    from lsp.run_config import dir_problem
    from lsp.train.load import load_run
    if (problem := dir_problem(out_dir)) is not None:
        raise ValueError(f"out_dir: {problem}")
    return export_model(*load_run(run_dir), out_dir, max_shard_bytes)


def export_model(model, tokenizer, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> List[str]:
    """Write a HybridLM (fp32 weights as they are) and its lsp tokenizer as a Hugging Face folder."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:   # what dir_problem cannot see beforehand (root on a read-only file system)
        raise ValueError(f"out_dir: cannot create {out_dir}: {err.strerror}") from None
    for stale in glob.glob(os.path.join(out_dir, "model*.safetensors*")):   # an earlier export's shards
        os.remove(stale)
    written = write_weights(export_state_dict(model), out_dir, max_shard_bytes)
    write_json(os.path.join(out_dir, "config.json"), hf_config(model, tokenizer))
    shutil.copyfile(MODELING_FILE, os.path.join(out_dir, "modeling_lsp.py"))
    written += ["config.json", "modeling_lsp.py"] + write_tokenizer(tokenizer, out_dir)
    return written + write_readme(out_dir, has_tokenizer="tokenizer.json" in written)


def write_readme(out_dir: str, has_tokenizer: bool) -> List[str]:
    """OUT_DIR/README.md: how to load the folder. The model is remote code (trust_remote_code=True); the tokenizer
    is a plain `tokenizers` file, but transformers >= 5's AutoTokenizer reads config.json first, whose AutoConfig is
    that remote code, so without trust_remote_code it asks y/N (15 s on a terminal): the README says so and names
    the class that reads the tokenizer without any remote code."""
    lines = ["# An lsp hybrid linear/softmax attention model (`lsp export`)", "",
             "Needs `lsp` and `transformers` where it is loaded (`pip install 'lsp-hybrid[hf]'`).", "",
             "```python", "from transformers import AutoModelForCausalLM",
             "model = AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)   # modeling_lsp.py"]
    if has_tokenizer:
        lines += ["from transformers import PreTrainedTokenizerFast",
                  "tokenizer = PreTrainedTokenizerFast.from_pretrained(OUT_DIR)   # tokenizer.json: no remote code",
                  "```", "",
                  "`AutoTokenizer.from_pretrained(OUT_DIR, trust_remote_code=True)` gives the same tokenizer. Without",
                  "`trust_remote_code`, transformers >= 5 asks y/N first (it reads config.json, whose `AutoConfig` is",
                  "the remote code of `modeling_lsp.py`): use `PreTrainedTokenizerFast` as above to avoid the prompt."]
    else:
        lines += ["```", "", "No tokenizer: this run's tokens are ids (the built-in MQAR task)."]
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return ["README.md"]


def import_hf(hf_dir: str):
    """The way back: the HybridLM of an `lsp export` folder (config.json + model*.safetensors), fp32, CPU, exactly
    the exported weights. Needs only safetensors."""
    from lsp.models import HybridConfig, HybridLM
    config, tensors = read_hf_folder(hf_dir)
    model = HybridLM(HybridConfig.from_dict(config))
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def export_state_dict(model) -> Dict[str, torch.Tensor]:
    """lsp parameter names under the wrapper's prefix `model.` (a tied head is embed.weight, stored once)."""
    return {f"{PREFIX}{name}": t.detach().contiguous() for name, t in model.state_dict().items()}


def shard(tensors: Dict[str, torch.Tensor], max_bytes: int) -> List[Dict[str, torch.Tensor]]:
    """Consecutive groups of tensors of at most max_bytes each (a larger tensor gets a shard of its own)."""
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write_weights(tensors: Dict[str, torch.Tensor], out_dir: str, max_bytes: int) -> List[str]:
    from safetensors.torch import save_file
    shards = shard(tensors, max_bytes)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, part in zip(names, shards):
        save_file(part, os.path.join(out_dir, name), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {key: name for name, part in zip(names, shards) for key in part}}
    write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
    return names + ["model.safetensors.index.json"]


def hf_config(model, tokenizer) -> dict:
    cfg = model.cfg
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
            "auto_map": {"AutoConfig": "modeling_lsp.LspHybridConfig",
                         "AutoModelForCausalLM": f"modeling_lsp.{ARCHITECTURE}"},
            "lsp": cfg.to_dict(), "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "eos_token_id": tokenizer.eos_id, "tie_word_embeddings": False, "dtype": "float32"}


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ----------------------------------------------------------------------------------------------------- tokenizer
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (what a ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def byte_tokenizer_json() -> dict:
    """lsp's byte tokenizer as a `tokenizers` file: byte-level BPE, no merges, id of byte b = b."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": {ch: b for b, ch in bytes_to_unicode().items()},
                      "merges": []}}


def write_tokenizer(tokenizer, out_dir: str) -> List[str]:
    if tokenizer.eos_id is None:   # MQAR: the tokens are ids, there is no text to tokenise
        return []
    if tokenizer.name == "byte":
        spec = byte_tokenizer_json()
    else:
        spec = json.loads(tokenizer.tok.to_str())
    spec["added_tokens"] = list(spec.get("added_tokens") or []) + [
        {"id": tokenizer.eos_id, "content": EOS_TOKEN, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}]
    write_json(os.path.join(out_dir, "tokenizer.json"), spec)
    write_json(os.path.join(out_dir, "tokenizer_config.json"),
               {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN,
                "clean_up_tokenization_spaces": False})
    write_json(os.path.join(out_dir, "special_tokens_map.json"), {"eos_token": EOS_TOKEN})
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
