"""generate() of an `lsp export` folder through transformers vs lsp's own HybridLM.generate, side by side.

    python benchmarks/hf_generate.py [--tokens 400] [--repeats 2]     # needs lsp[hf]; CPU, one thread

The model is configs/tiny-cpu.yaml's (untrained, seed 0, byte vocabulary); the prompt is a short byte string. Both
decode greedily for exactly --tokens tokens and must produce the same ids. Also prints transformers' deprecation
warnings seen meanwhile (an exported model that passes its cache under an old name re-feeds the prefix and warns).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lsp.export import export_model  # noqa: E402
from lsp.models import HybridLM  # noqa: E402
from lsp.run_config import hybrid_config, load_config  # noqa: E402
from lsp.train.tokenizer import ByteTokenizer  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = HybridLM(hybrid_config(load_config(str(CONFIG), ["logging.wandb=false"]), 257)).eval()
    out = tempfile.mkdtemp()
    export_model(model, ByteTokenizer(), out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    records, handler = [], logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    prompt = torch.tensor([list(b"the quick brown fox")])
    n = args.tokens
    with torch.no_grad():
        for rep in range(args.repeats):
            start = time.perf_counter()
            a = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            t_hf = time.perf_counter() - start
            start = time.perf_counter()
            b = model.generate(prompt, n)
            t_lsp = time.perf_counter() - start
            print(f"repeat {rep}: transformers generate {t_hf:.2f} s, lsp generate {t_lsp:.2f} s for {n} tokens, "
                  f"same ids: {torch.equal(a, b)}")
    warned = sorted({r.getMessage() for r in records if "deprecated" in r.getMessage()})
    print(f"transformers {transformers.__version__}; deprecation warnings: {warned or 'none'}")


if __name__ == "__main__":
    main()
