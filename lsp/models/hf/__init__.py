"""Hugging Face face of `HybridLM`: `modeling_lsp.py` is the remote code that `lsp export` writes next to the weights
(`AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`); it needs `lsp` and `transformers`."""
import os

MODELING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling_lsp.py")
MODEL_TYPE = "lsp_hybrid"
ARCHITECTURE = "LspHybridForCausalLM"
