"""Bad data: non-UTF-8 bytes, broken .jsonl lines, empty corpora, documents longer than a sequence, a damaged token
cache. Each is either handled without losing a byte (documented in docs/reliability.md) or one clear line, exit 2."""
import json
import os

import numpy as np
import pytest

from lsp.names import IGNORE_INDEX
from lsp.run_config import ConfigError
from lsp.train.documents import iter_documents
from lsp.train.packed import PackedTokens
from lsp.train.token_file import build_token_file
from lsp.train.tokenizer import make_tokenizer

from .conftest import run_lsp

FILES = ["data.kind=files", "train.micro_batch=1", "parallel.sp=1", "logging.wandb=false", "train.steps=2"]


def stream(stem):
    with open(stem + ".json") as f:
        meta = json.load(f)
    return np.fromfile(stem + ".tokens", dtype=meta["dtype"]).tolist(), meta


def test_non_utf8_bytes_are_kept_exactly(tmp_path):
    raw = b"caf\xe9 \xff\xfe ok \xc3\xa9\n"                   # latin-1 bytes, invalid UTF-8, then valid UTF-8
    (tmp_path / "a.txt").write_bytes(raw)
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "x\xff"}\n\n{"text": "y"}\n')
    stem = build_token_file([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], make_tokenizer("byte"),
                            str(tmp_path / "cache"))
    tokens, meta = stream(stem)
    eos = 256
    assert tokens == list(raw) + [eos] + list(b"x\xff") + [eos] + list(b"y") + [eos]   # not one byte lost
    assert meta["num_docs"] == 3
    # negative control: the usual errors="replace" decoding would have changed the stream
    replaced = list(raw.decode("utf-8", errors="replace").encode("utf-8"))
    assert replaced != list(raw)


@pytest.mark.parametrize("line,why", [(b"{not json", "JSONDecodeError"), (b'{"txt": "a"}', "KeyError"),
                                      (b'["a"]', "TypeError"), (b'{"text": 5}', "not a string")])
def test_broken_jsonl_line_names_file_and_line(tmp_path, line, why):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + line + b"\n")
    with pytest.raises(ConfigError, match=rf"data.files: {path}:2.*{why}"):
        list(iter_documents([str(path)]))


@pytest.mark.parametrize("content", [b"", b"short"])
def test_empty_or_too_small_corpus_is_one_line_exit_2(tmp_path, content):
    (tmp_path / "e.txt").write_bytes(content)
    out = tmp_path / "out"
    proc = run_lsp("train", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny-cpu.yaml"),
                   *FILES, f"data.files=[{tmp_path}/e.txt]", f"data.cache_dir={tmp_path}/cache", f"out_dir={out}",
                   timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("config error: data.files: the files hold 1 documents"), proc.stderr
    assert "fewer than data.seq_len + 1 = 65" in proc.stderr
    assert not out.exists()


def test_empty_jsonl_is_one_line(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"\n\n")
    stem = build_token_file([str(tmp_path / "e.jsonl")], make_tokenizer("byte"), str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="data.files: the files hold 0 documents, 0 tokens"):
        PackedTokens(stem, 8, 0.0)


def test_long_documents_are_split_across_sequences_not_truncated(tmp_path):
    """A document longer than seq_len continues in the next window; every in-document next-token target is trained
    on exactly once, and only targets that cross a document boundary are ignored."""
    docs = ["a" * 50, "b" * 7, "c" * 23]                      # 50 > 2 * seq_len
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stem = build_token_file([str(tmp_path / "d.jsonl")], make_tokenizer("byte"), str(tmp_path / "cache"))
    T = 16
    data = PackedTokens(stem, T, 0.0)
    tokens, _ = stream(stem)
    assert data.num_train == (len(tokens) - 1) // T == 5
    seen_inputs, targets = [], []
    for i in range(data.num_train):
        x, y, cu = data.window(i)
        seen_inputs += x.tolist()
        targets += [(i * T + t, int(y[t])) for t in range(T) if y[t] != IGNORE_INDEX]
    assert seen_inputs == tokens[:data.num_train * T]          # windows tile the stream: nothing truncated
    # independent answer key: position p predicts p+1 unless p is a document's end-of-document token
    eos_positions = {p for p, tok in enumerate(tokens) if tok == 256}
    expected = [(p, tokens[p + 1]) for p in range(data.num_train * T) if p not in eos_positions]
    assert targets == expected
    # the first document spans windows 0..3: its targets at window ends are kept (split, not cut)
    assert (T - 1, ord("a")) in targets and (2 * T - 1, ord("a")) in targets
    # negative control: a truncating packer (one document per window, cut at T) would lose most of document 1
    truncated = [(p, tokens[p + 1]) for p in range(T - 1)]
    assert len(truncated) < sum(1 for p, _ in expected if p < 50)


def test_damaged_token_cache_is_rebuilt(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 20)
    cache = str(tmp_path / "cache")
    stem = build_token_file([str(tmp_path / "a.txt")], make_tokenizer("byte"), cache)
    good, _ = stream(stem)
    with open(stem + ".tokens", "r+b") as f:                # truncated by a full disk / an interrupted copy
        f.truncate(10)
    assert build_token_file([str(tmp_path / "a.txt")], make_tokenizer("byte"), cache) == stem
    assert stream(stem)[0] == good
    # control: an intact cache is reused, not rebuilt (its mtime does not move)
    mtime = os.stat(stem + ".tokens").st_mtime_ns
    build_token_file([str(tmp_path / "a.txt")], make_tokenizer("byte"), cache)
    assert os.stat(stem + ".tokens").st_mtime_ns == mtime
