"""Data path at scale: tokenisation throughput vs. worker processes, and shuffle lookup cost.

    python benchmarks/data_scale.py                 # 64 MB synthetic jsonl corpus, byte + BPE tokenizers
    python benchmarks/data_scale.py --mb 8 --quick  # small

Tokenisation: `build_token_file(..., workers=w)` on the same corpus (a fresh cache each time), MB of text per
second; the BPE tokenizer (if `tokenizers` is installed) is trained here on the corpus's first MB (vocab 4096).
Shuffle: reading one position of the epoch shuffle at n sequences, the old `rng.permutation(n)[i]` against
`lsp.train.shuffle.shuffled_position` (mean over 1000 lookups).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table  # noqa: E402

from lsp.train.shuffle import shuffled_position  # noqa: E402
from lsp.train.token_file import build_token_file  # noqa: E402
from lsp.train.tokenizer import make_tokenizer  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from language model sequence parallel attention "
         "state decay chunk token naïve café 文字 über").split()


def write_corpus(path: str, megabytes: float) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < megabytes * 1e6:
            line = json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(20, 400)))}) + "\n"
            written += f.write(line)


def bpe_tokenizer(corpus: str, out: str):
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        return None
    with open(corpus, encoding="utf-8") as f:
        sample = [json.loads(line)["text"] for line, _ in zip(f, range(2000))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=4096, show_progress=False))
    tok.save(out)
    return out


def tokenise_rates(corpus: str, spec: str, workers_list, work: str) -> list[dict]:
    tokenizer = make_tokenizer(spec)
    mb = os.path.getsize(corpus) / 1e6
    rows = []
    for workers in workers_list:
        cache = os.path.join(work, f"cache-{workers}")
        start = time.perf_counter()
        build_token_file([corpus], tokenizer, cache, workers=workers, progress=False)
        seconds = time.perf_counter() - start
        shutil.rmtree(cache)
        rows.append({"tokenizer": tokenizer.name[:9], "workers": workers, "MB": mb, "s": seconds,
                     "MB/s": mb / seconds})
    for r in rows:
        r["speed-up"] = r["MB/s"] / rows[0]["MB/s"]
    return rows


def shuffle_costs(sizes) -> list[dict]:
    rows = []
    for n in sizes:
        start = time.perf_counter()
        np.random.default_rng([0, 1]).permutation(n)[n // 2]
        old = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(1000):
            shuffled_position((i * 7919) % n, n, 0, 1)
        new = (time.perf_counter() - start) / 1000
        rows.append({"n": n, "permutation s": old, "feistel us": new * 1e6, "ratio": old / new})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=sorted({1, 2, os.cpu_count() or 1}))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    sizes = [1_000_000] if args.quick else [1_000_000, 24_000_000]
    with tempfile.TemporaryDirectory() as work:
        corpus = os.path.join(work, "corpus.jsonl")
        write_corpus(corpus, args.mb)
        rows = tokenise_rates(corpus, "byte", args.workers, work)
        bpe = None if args.quick else bpe_tokenizer(corpus, os.path.join(work, "bpe.json"))
        if bpe:
            rows += tokenise_rates(corpus, bpe, args.workers, work)
    print_table(rows, f"tokenisation, {os.cpu_count()} cores (shared with other jobs)")
    shuffles = shuffle_costs(sizes)
    print_table(shuffles, "one lookup in the epoch shuffle")
    return rows, shuffles


if __name__ == "__main__":
    main()
