"""Hugging Face face of `HybridLM`: `modeling_lsp.py` is the remote code that `lsp export` writes next to the weights
(`AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`); it needs `lsp` and `transformers`.
`read_hf_folder` reads such a folder back with safetensors alone."""
import json
import os

MODELING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling_lsp.py")
MODEL_TYPE = "lsp_hybrid"
ARCHITECTURE = "LspHybridForCausalLM"
PREFIX = "model."


def read_hf_folder(hf_dir: str):
    """(lsp HybridConfig dict, {lsp parameter name: tensor}) of an `lsp export` folder, sharded or not."""
    from safetensors.torch import load_file
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{hf_dir} holds model_type {config.get('model_type')!r}, not an lsp export ({MODEL_TYPE!r})")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {k: v for name in files for k, v in load_file(os.path.join(hf_dir, name)).items()}
    return config["lsp"], {k.removeprefix(PREFIX): v for k, v in tensors.items()}
