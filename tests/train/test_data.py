"""Data: MQAR samples against an independent answer key, packing / cu_seqlens, token file written once, dp sharding."""
import json
import os

import numpy as np
import pytest
import torch

from lsp.names import IGNORE_INDEX
from lsp.run_config import load_config
from lsp.train import documents
from lsp.train.data import DataLoader
from lsp.train.mqar import MQAR
from lsp.train.packed import PackedTokens
from lsp.train.token_file import build_token_file
from lsp.train.tokenizer import make_tokenizer

from .conftest import SMALL


def recall_answers(tokens, num_kv_pairs):
    """Independent answer key: a query is a context key seen again after the context; its answer is the token that
    followed that key in the context."""
    context = {int(tokens[2 * i]): int(tokens[2 * i + 1]) for i in range(num_kv_pairs)}
    return {t: context[int(tok)] for t in range(2 * num_kv_pairs, len(tokens)) if int(tok := tokens[t]) in context}


def check_mqar(tokens, labels, cfg):
    q = cfg.data.mqar
    keys = tokens[0:2 * q.num_kv_pairs:2]
    assert len(set(keys.tolist())) == q.num_kv_pairs and keys.min() >= 1 and keys.max() <= q.num_keys
    answers = recall_answers(tokens, q.num_kv_pairs)
    assert len(answers) == q.num_queries
    expected = np.full_like(labels, IGNORE_INDEX)
    for t, v in answers.items():
        expected[t] = v
    return np.array_equal(labels, expected)


def test_mqar_samples_match_answer_key():
    cfg = load_config(None, SMALL)
    task = MQAR(cfg.data, seed=0)
    assert task.vocab_size == 1 + 32 + 32
    for i in range(20):
        tokens, labels = task.sample(i)
        assert tokens.shape == labels.shape == (32,)
        assert check_mqar(tokens, labels, cfg)
        # negative control: labels shifted by one position (the classic misalignment) must fail the key
        assert not check_mqar(tokens, np.roll(labels, 1), cfg)
    # deterministic by (seed, index), different across indices / seeds / splits
    assert np.array_equal(task.sample(3)[0], MQAR(cfg.data, seed=0).sample(3)[0])
    assert not np.array_equal(task.sample(3)[0], task.sample(4)[0])
    assert not np.array_equal(task.sample(3)[0], MQAR(cfg.data, seed=1).sample(3)[0])
    assert not np.array_equal(task.sample(3)[0], task.sample(3, "val")[0])


def test_loader_dp_shards_partition_the_global_batch():
    cfg = load_config(None, SMALL + ["train.micro_batch=2", "train.grad_accum=2"])
    full = DataLoader(cfg, dp_rank=0, dp_size=1)
    cfg1 = load_config(None, SMALL + ["train.micro_batch=1", "train.grad_accum=2"])   # same global batch of 4
    shards = [DataLoader(cfg1, dp_rank=r, dp_size=2) for r in range(2)]
    for step in (0, 5):
        whole = torch.cat([b.input_ids for b in full.micro_batches(step)])
        parts = torch.cat([b.input_ids for s in shards for b in s.micro_batches(step)])
        assert whole.shape == (4, 32)
        assert sorted(map(tuple, whole.tolist())) == sorted(map(tuple, parts.tolist()))
    a, b = full.micro_batches(0)[0].input_ids, full.micro_batches(1)[0].input_ids
    assert not torch.equal(a, b)


@pytest.fixture
def corpus(tmp_path):
    docs = ["hello world", "a" * 50, "ünïcödé text", "x", "the quick brown fox jumps over the lazy dog " * 3]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path), docs


def test_packing_and_cu_seqlens(corpus, tmp_path):
    path, docs = corpus
    tok = make_tokenizer("byte")
    stem = build_token_file([path], tok, str(tmp_path / "cache"))
    stream = [t for d in docs for t in list(d.encode()) + [tok.eos_id]]   # independent reference stream
    T = 16
    packed = PackedTokens(stem, T, val_fraction=0.0)
    assert packed.num_train == (len(stream) - 1) // T
    doc_ends = np.cumsum([len(d.encode()) + 1 for d in docs])            # exclusive end of each document
    for i in range(packed.num_train):
        tokens, labels, cu = packed.window(i)
        lo = i * T
        assert tokens.tolist() == stream[lo:lo + T]
        for t in range(T):   # label = next token unless t is the last token of a document
            crosses = (lo + t + 1) in doc_ends
            assert labels[t] == (IGNORE_INDEX if crosses else stream[lo + t + 1])
        starts = [0] + [e - lo for e in doc_ends if lo < e < lo + T] + [T]
        assert cu.dtype == np.int32 and cu.tolist() == starts
    # negative control: a window misaligned by one token does not match the reference
    assert packed.window(0)[0].tolist() != stream[1:T + 1]


def test_token_file_written_once(corpus, tmp_path, monkeypatch):
    path, _ = corpus
    cache = str(tmp_path / "cache")
    stem = build_token_file([path], make_tokenizer("byte"), cache)
    mtime = os.stat(stem + ".tokens").st_mtime_ns
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(stem) + e for e in (".tokens", ".docs", ".json"))

    def boom(paths):
        raise AssertionError("re-tokenised")
    monkeypatch.setattr(documents, "iter_documents", boom)
    assert build_token_file([path], make_tokenizer("byte"), cache) == stem
    assert os.stat(stem + ".tokens").st_mtime_ns == mtime
    # a changed corpus gets a new token file (so the cache can never serve stale tokens)
    with open(path, "a") as f:
        f.write(json.dumps({"text": "more"}) + "\n")
    with pytest.raises(AssertionError, match="re-tokenised"):
        build_token_file([path], make_tokenizer("byte"), cache)


def test_files_loader_batches(corpus, tmp_path):
    path, _ = corpus
    cfg = load_config(None, SMALL + ["data.kind=files", f"data.files=[{path}]", "train.micro_batch=1",
                                     f"data.cache_dir={tmp_path}/c", "data.seq_len=16", "data.val_fraction=0.2"])
    loader = DataLoader(cfg)
    assert loader.vocab_size == 257
    (batch,) = loader.micro_batches(0)
    assert batch.input_ids.shape == (1, 16) and batch.cu_seqlens[0] == 0 and batch.cu_seqlens[-1] == 16
    # every window of an epoch is visited exactly once (seeded permutation)
    n = loader.source.num_train
    assert sorted(loader._row(s) for s in range(n)) == list(range(n))
    assert [loader._row(s) for s in range(n)] != [loader._row(n + s) for s in range(n)]   # reshuffled per epoch
    windows = [loader.source.window(loader._row(s))[0].tolist() for s in range(n)]
    assert [loader.micro_batches(s)[0].input_ids[0].tolist() for s in range(n)] == windows


def test_training_on_packed_files(tmp_path):
    from lsp.train.trainer import Trainer
    words = "the of and to in is was for on that with as by at from".split()
    rng = np.random.default_rng(0)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 40)))}) + "\n"
                            for _ in range(200)))
    cfg = load_config(None, SMALL + ["data.kind=files", f"data.files=[{path}]", "train.micro_batch=1",
                                     "train.grad_accum=2", f"data.cache_dir={tmp_path}/c", "data.seq_len=64",
                                     f"out_dir={tmp_path}", "train.steps=8", "optim.lr=3e-3"])
    trainer = Trainer(cfg)
    # several documents per packed sequence (in some of the first windows: which ones depends on the shuffle)
    assert any(len(b.cu_seqlens) > 2 for step in range(4) for b in trainer.data.micro_batches(step))
    result = trainer.fit()
    assert result["losses"][-1] < result["losses"][0] - 0.5 and "eval_loss" in result
