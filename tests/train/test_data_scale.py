"""Data at scale: O(1) shuffle lookup (`lsp.train.shuffle`) and parallel tokenisation (`lsp.train.tokenizing`)."""
import json
import os
import sys

import numpy as np
import pytest

import lsp.train.shuffle as shuffle
import lsp.train.tokenizing as tokenizing
from lsp.train.token_file import build_token_file
from lsp.train.tokenizer import make_tokenizer


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 1000, 4097])
def test_shuffle_is_a_permutation_per_seed_and_epoch(n):
    for seed, epoch in [(0, 0), (0, 1), (7, 0)]:
        assert sorted(shuffle.shuffled_position(i, n, seed, epoch) for i in range(n)) == list(range(n))


def rank_correlation(n, seed=0, epoch=0):
    order = np.array([shuffle.shuffled_position(i, n, seed, epoch) for i in range(n)], dtype=float)
    return np.corrcoef(np.arange(n), order)[0, 1], int((order == np.arange(n)).sum())


def test_shuffle_mixes(monkeypatch):
    n = 5000
    corr, fixed = rank_correlation(n)
    # a uniform random permutation: correlation ~ N(0, 1/n) (sd 0.014), ~1 fixed point
    assert abs(corr) < 0.06 and fixed < 8
    other = [shuffle.shuffled_position(i, n, 0, 1) for i in range(50)]
    assert other != [shuffle.shuffled_position(i, n, 0, 0) for i in range(50)]          # per epoch
    assert other != [shuffle.shuffled_position(i, n, 1, 1) for i in range(50)]          # per seed
    monkeypatch.setattr(shuffle, "ROUNDS", 0)   # control: no rounds = the identity, which the check rejects
    corr, fixed = rank_correlation(n)
    assert corr > 0.99 and fixed == n


def test_shuffle_lookup_is_constant_time(monkeypatch):
    # count Feistel passes instead of timing: cycle walking needs < 4 on average on a domain < 4n
    calls = []
    inner = shuffle.feistel
    monkeypatch.setattr(shuffle, "feistel", lambda *a: calls.append(1) or inner(*a))
    n = 24_000_000
    rows = [shuffle.shuffled_position(i * 4801, n, 3, 2) for i in range(2000)]
    assert len(set(rows)) == 2000 and all(0 <= r < n for r in rows)
    assert len(calls) / 2000 < 4


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over lazy dog naïve café 文字".split()
    docs = [" ".join(rng.choice(words, rng.integers(1, 60))) for _ in range(300)]
    paths = [tmp_path / "a.jsonl", tmp_path / "b.txt"]
    paths[0].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:-1]), encoding="utf-8")
    paths[1].write_text(docs[-1], encoding="utf-8")
    return [str(p) for p in paths], docs


def read_token_file(stem):
    with open(stem + ".json") as f:
        meta = json.load(f)
    return np.fromfile(stem + ".tokens", dtype=meta["dtype"]).tolist(), np.fromfile(stem + ".docs", np.int64).tolist()


def test_parallel_tokenisation_equals_serial_reference(corpus, tmp_path, monkeypatch):
    paths, docs = corpus
    tok = make_tokenizer("byte")
    # reference: every document's bytes then eos, in corpus order; starts of the documents + the total
    expected = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
    lengths = [len(tok.encode(d)) + 1 for d in docs]
    starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    monkeypatch.setattr(tokenizing, "BATCH_CHARS", 500)   # many batches, so that the order across workers matters
    for workers in (1, 2, 3):
        stem = build_token_file(paths, tok, str(tmp_path / f"cache{workers}"), workers=workers, progress=False)
        assert read_token_file(stem) == (expected, starts)
    # control: the comparison sees document order
    swapped = [t for d in docs[1:2] + docs[:1] + docs[2:] for t in tok.encode(d) + [tok.eos_id]]
    assert swapped != expected


def test_progress_bar_counts_the_corpus(corpus, tmp_path, capsys):
    paths, _ = corpus
    build_token_file(paths, make_tokenizer("byte"), str(tmp_path / "c"), workers=2, progress=True)
    assert "tokenising" in capsys.readouterr().err


def test_data_scale_benchmark_quick():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "data_scale.py")
    spec = importlib.util.spec_from_file_location("bench_data_scale", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows, shuffles = bench.main(["--mb", "0.5", "--quick", "--workers", "1", "2"])
    assert [r["workers"] for r in rows] == [1, 2] and all(r["MB/s"] > 0 for r in rows)
    assert shuffles[0]["feistel us"] > 0


@pytest.fixture
def mixed_corpus(tmp_path):
    """jsonl files (documents split by line), whole-file documents, an empty file: what ranks must split."""
    rng = np.random.default_rng(1)
    words = "alpha beta gamma delta épsilon 文字".split()
    doc = lambda: " ".join(rng.choice(words, rng.integers(0, 30)))  # noqa: E731
    paths = []
    for i, kind in enumerate(["jsonl", "txt", "txt", "jsonl", "txt"]):
        path = tmp_path / f"f{i}.{kind}"
        if kind == "jsonl":
            path.write_text("".join(json.dumps({"text": doc()}) + "\n" + ("\n" if j % 7 == 0 else "")
                                    for j in range(40)), encoding="utf-8")
        else:
            path.write_text(doc() if i != 2 else "", encoding="utf-8")
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("world", [2, 3, 5, 64])
def test_rank_byte_ranges_split_documents_exactly_once(mixed_corpus, world):
    from lsp.train.documents import iter_documents
    from lsp.train.tokenizing import rank_byte_range
    total = sum(os.path.getsize(p) for p in mixed_corpus)
    whole = list(iter_documents(mixed_corpus))
    split = [d for r in range(world) for d in iter_documents(mixed_corpus, rank_byte_range(total, r, world))]
    assert split == whole
    # control: ranges that overlap by the first byte of a line repeat that document, which the comparison sees
    lines = open(mixed_corpus[0], "rb").read().split(b"\n")
    line_start = len(lines[0]) + len(lines[1]) + 2      # line 2 (line 1 is blank)
    overlap = list(iter_documents(mixed_corpus, (0, line_start + 1))) + list(iter_documents(mixed_corpus,
                                                                                             (line_start, None)))
    assert len(overlap) == len(whole) + 1


def build_on_ranks(paths, cache, world, tok):
    # every "rank" in a thread of its own, all at once, as under torchrun (they share only the cache directory)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(world) as pool:
        futures = [pool.submit(build_token_file, paths, tok, cache, workers=1, progress=False, rank=r, world=world)
                   for r in range(world)]
        return [f.exception() or f.result() for f in futures]


@pytest.mark.parametrize("world", [2, 3])
def test_token_file_built_by_ranks_equals_one_process(mixed_corpus, tmp_path, world):
    tok = make_tokenizer("byte")
    serial = build_token_file(mixed_corpus, tok, str(tmp_path / "one"), workers=1, progress=False)
    stems = build_on_ranks(mixed_corpus, str(tmp_path / "ranks"), world, tok)
    assert len(set(stems)) == 1 and read_token_file(stems[0]) == read_token_file(serial)
    with open(stems[0] + ".json") as f, open(serial + ".json") as g:
        assert json.load(f) == json.load(g)
    assert sorted(os.listdir(tmp_path / "ranks")) == sorted(os.listdir(tmp_path / "one"))   # parts removed


def test_data_error_on_one_rank_stops_every_rank(mixed_corpus, tmp_path):
    from lsp.run_config import ConfigError
    with open(mixed_corpus[3], "a") as f:   # the second jsonl file: near the end, on the last rank
        f.write("not json\n")
    line = sum(1 for _ in open(mixed_corpus[3]))
    results = build_on_ranks(mixed_corpus, str(tmp_path / "c"), 3, make_tokenizer("byte"))
    assert all(isinstance(r, ConfigError) for r in results)
    assert {str(r) for r in results} == {f"data.files: {mixed_corpus[3]}:{line} is not a JSON object with a "
                                         "\"text\" field (JSONDecodeError)"}


@pytest.mark.slow
def test_two_rank_launch_tokenises_like_one_process(mixed_corpus, tmp_path):
    from tests.train.conftest import SMALL, TINY, run_lsp
    proc = run_lsp("launch", "--nproc-per-node", "2", TINY, f"out_dir={tmp_path}", "name=files", *SMALL,
                   "data.kind=files", f"data.files=[{','.join(mixed_corpus)}]", f"data.cache_dir={tmp_path / 'ranks'}",
                   "train.micro_batch=1", "train.steps=2", "data.seq_len=16", "data.val_fraction=0.2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    serial = build_token_file(mixed_corpus, make_tokenizer("byte"), str(tmp_path / "one"), workers=1, progress=False)
    (ranks,) = [f for f in os.listdir(tmp_path / "ranks") if f.endswith(".tokens")]
    assert read_token_file(str(tmp_path / "ranks" / ranks[:-len(".tokens")])) == read_token_file(serial)


def test_default_workers(monkeypatch):
    from lsp.train.tokenizer import ByteTokenizer
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    big = 1 << 30
    assert tokenizing.default_workers(1 << 20) == 1                      # small: a pool costs more than it saves
    assert tokenizing.default_workers(big, ByteTokenizer()) == 1         # numpy-fast: shipping text costs more
    assert tokenizing.default_workers(big, object()) == (os.cpu_count() or 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * (os.cpu_count() or 1)))   # more local ranks than cores
    assert tokenizing.default_workers(big, object()) == 1


_WATCHED = []   # (suffix, opened-for-writing paths) while a test watches; audit hooks cannot be removed


def _audit(event, args):
    if _WATCHED and event == "open" and isinstance(args[0], str) and args[0].endswith(_WATCHED[0][0]) \
            and args[1] is not None and set(str(args[1])) & set("wax+"):
        _WATCHED[0][1].append(args[0])


sys.addaudithook(_audit)   # idle (one list check per audited event) unless a test fills _WATCHED


def test_rank_error_file_appears_whole(tmp_path):
    # the ranks waiting on a part poll for `<part>.error` and json.load it: the name must never be opened for
    # writing (a poller would read an empty or half-written file), only renamed onto (flaked once in CI before)
    from lsp.run_config import ConfigError
    part = str(tmp_path / "x.part1of3")
    _WATCHED.append((".error", []))
    try:
        with pytest.raises(ConfigError), tokenizing.errors_shared(part):
            raise ConfigError("data.files", "f.jsonl:3 is not a JSON object")
        opened = _WATCHED[0][1]
    finally:
        _WATCHED.clear()
    assert opened == []
    with pytest.raises(ConfigError, match=r"^data.files: f.jsonl:3 is not a JSON object$"):
        tokenizing.wait_for(lambda: False, "parts", [part])
