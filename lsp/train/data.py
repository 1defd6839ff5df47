"""Training data: the built-in MQAR task (the default, no files) and packed text: local files or a Hugging Face
`datasets` corpus (`hf_data.py`), tokenised once into the same token file.

Both sources are *indexable*: sample i is a pure function of (seed, i), so a batch is fixed by the global step, each
dp rank reads only its own rows, and resuming needs nothing but the step number (`DataState.step`).
Each rank then keeps only its sequence-parallel shard of the tokens (`sp.shard(x, dim=1)`, done by the trainer).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Iterable, List, Optional

import numpy as np
import torch

from lsp.names import IGNORE_INDEX
from lsp.run_config import Config, ConfigError, DataConfig

from .shuffle import shuffled_position
from .tokenizing import (
    default_workers,
    encoded_batches,
    errors_shared,
    progress_bar,
    rank_byte_range,
    rank_part,
    wait_for,
)


@dataclass
class Batch:
    input_ids: torch.Tensor              # [B, T] long
    labels: torch.Tensor                 # [B, T] long, labels[t] = token t+1 or IGNORE_INDEX
    cu_seqlens: Optional[torch.Tensor]   # [N + 1] int32 global document boundaries (B == 1) or None


# --------------------------------------------------------------------------------------------------- MQAR
class MQAR:
    """Multi-query associative recall (Zoology, Arora et al. 2023; Based, 2024).

    Token ids: 0 = filler, keys in [1, 1 + num_keys), values in [1 + num_keys, 1 + num_keys + num_values).
    A sequence of length T is `k_1 v_1 ... k_P v_P` (P distinct keys, random values) followed by filler in which Q of
    the keys are asked again at random even offsets, each followed by its value:  `... 0 0 k_j v_j 0 ...` (without
    repetition when Q <= P; more queries than pairs ask some keys repeatedly, for more recall targets per sequence).
    labels[t] = v_j exactly at the position t of a queried k_j (the model must predict the value it saw bound to
    that key), everything else is IGNORE_INDEX, so the loss and the accuracy are measured on recall only.
    """

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.q, self.seed = cfg, cfg.mqar, seed
        self.vocab_size = 1 + self.q.num_keys + self.q.num_values

    def sample(self, index: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        # -> tokens [T], labels [T]
        q, T = self.q, self.cfg.seq_len
        rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, index])
        keys = 1 + rng.choice(q.num_keys, size=q.num_kv_pairs, replace=False)
        values = 1 + q.num_keys + rng.integers(0, q.num_values, size=q.num_kv_pairs)
        tokens = np.zeros(T, dtype=np.int64)
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
        tokens[0:2 * q.num_kv_pairs:2], tokens[1:2 * q.num_kv_pairs:2] = keys, values
        slots = (T - 2 * q.num_kv_pairs) // 2          # disjoint (key, value) slots after the context
        starts = 2 * q.num_kv_pairs + 2 * np.sort(rng.choice(slots, size=q.num_queries, replace=False))
        # each key is asked at most once while there are enough keys; beyond that, keys repeat
        asked = rng.choice(q.num_kv_pairs, size=q.num_queries, replace=q.num_queries > q.num_kv_pairs)
        tokens[starts], tokens[starts + 1] = keys[asked], values[asked]
        labels[starts] = values[asked]
        return tokens, labels


# ----------------------------------------------------------------------------------------- packed text files
class ByteTokenizer:
    """UTF-8 bytes 0..255 and one end-of-document id 256."""
    vocab_size = 257
    eos_id = 256
    name = "byte"

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8", errors="surrogateescape"))   # undecodable input bytes come back as is

    def encode_array(self, text: str) -> np.ndarray:
        # == encode(text) as int64 [N], without a Python int per byte (what bulk tokenisation uses)
        return np.frombuffer(text.encode("utf-8", errors="surrogateescape"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: List[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")   # eos and cut bytes dropped


class HFTokenizer:
    """A `tokenizers` JSON file (optional dependency)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("data.tokenizer", "a tokenizer JSON needs the `tokenizers` package "
                              "(pip install 'lsp-hybrid[tokenizers]'), or use data.tokenizer=byte") from None
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as err:   # tokenizers raises its own Exception type
            raise ConfigError("data.tokenizer", f"{path} could not be loaded by `tokenizers`: "
                              f"{str(err).splitlines()[0]}") from None
        self.vocab_size = self.tok.get_vocab_size() + 1
        self.eos_id = self.vocab_size - 1            # an id of our own, so documents never run together
        with open(path, "rb") as f:
            self.name = "hf-" + hashlib.sha1(f.read()).hexdigest()[:12]

    def encode(self, text: str) -> List[int]:
        clean = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
        return self.tok.encode(clean).ids

    def decode(self, ids: List[int]) -> str:
        return self.tok.decode([i for i in ids if i != self.eos_id])


class IdTokenizer:
    """Token ids written as text, "3 17 42" (runs on the built-in MQAR task, which has no text)."""
    eos_id = None
    name = "ids"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> List[int]:
        try:
            ids = [int(word) for word in text.split()]
        except ValueError:
            raise ValueError(f"prompt must be token ids separated by spaces (an MQAR run), got {text!r}") from None
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size}), got {text!r}")
        return ids

    def decode(self, ids: List[int]) -> str:
        return " ".join(str(i) for i in ids)


def make_tokenizer(spec: str):
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)


def iter_documents(paths: Iterable[str], byte_range: Optional[tuple] = None) -> Iterable[str]:
    """.jsonl: one JSON object per line with a "text" field; anything else: the whole file is one document.

    Files are read as bytes and decoded with errors="surrogateescape": invalid UTF-8 never stops a run, and the
    byte tokenizer turns the escapes back into the original bytes, so not one byte is lost (a `tokenizers` JSON
    sees U+FFFD instead). A .jsonl line that is not an object with a string "text" is a one-line error naming
    file:line. byte_range (lo, hi): only the documents whose first byte lies in [lo, hi) of the files laid end to
    end (hi None: to the end), which splits a corpus between ranks without splitting a document.
    """
    lo, hi = byte_range or (0, None)
    base = 0
    for path in paths:
        size = os.path.getsize(path)
        start, stop = max(lo - base, 0), None if hi is None else hi - base     # this file's share, local offsets
        base += size
        if stop is not None and stop <= 0 or start > 0 and start >= size:
            continue
        with open(path, "rb") as f:
            if not path.endswith(".jsonl"):
                if start == 0:
                    yield f.read().decode("utf-8", errors="surrogateescape")
                continue
            yield from _jsonl_documents(f, path, start, stop)


def _jsonl_documents(f, path: str, start: int, stop: Optional[int]) -> Iterable[str]:
    # the lines of f that start in [start, stop), numbered as in the whole file
    if start > 0:
        f.seek(start - 1)
        if f.read(1) != b"\n":
            f.readline()                      # the line under way at `start` belongs to the range before
    first = f.tell()
    number = 1 + _newlines_before(f, first)
    while stop is None or f.tell() < stop:
        raw = f.readline()
        if not raw:
            return
        line = raw.decode("utf-8", errors="surrogateescape")
        if line.strip():
            yield _jsonl_text(line, path, number)
        number += 1


def _newlines_before(f, pos: int) -> int:
    if pos == 0:
        return 0
    f.seek(0)
    count = 0
    while f.tell() < pos:
        count += f.read(min(1 << 24, pos - f.tell())).count(b"\n")
    return count


def _jsonl_text(line: str, path: str, number: int) -> str:
    try:
        text = json.loads(line)["text"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError("data.files", f"{path}:{number} is not a JSON object with a \"text\" "
                          f"field ({type(err).__name__})") from None
    if not isinstance(text, str):
        raise ConfigError("data.files", f"{path}:{number}: \"text\" is {type(text).__name__}, not a string")
    return text


class FileCorpus:
    """Local .txt / .jsonl files (`iter_documents`); ranks split them by byte ranges."""

    splittable = True

    def __init__(self, paths: List[str]):
        self.paths = list(paths)
        self.size = sum(os.path.getsize(p) for p in self.paths)   # bytes: the progress bar's and workers' measure

    def key(self) -> str:
        return "".join(f"{os.path.abspath(p)}|{os.stat(p).st_size}|{os.stat(p).st_mtime_ns}" for p in self.paths)

    def names(self) -> List[str]:
        return self.paths

    def documents(self, rank: int = 0, world: int = 1):
        # -> (the documents that start in rank's 1/world of the bytes, that share's size)
        if world == 1:
            return iter_documents(self.paths), self.size
        lo, hi = rank_byte_range(self.size, rank, world)
        return iter_documents(self.paths, (lo, hi)), (self.size if hi is None else hi) - lo


def corpus_of(d: DataConfig):
    """The corpus of a `data` section that is not MQAR: FileCorpus or `hf_data.HFCorpus`."""
    if d.kind == "hf":
        from .hf_data import HFCorpus
        return HFCorpus(d.hf)
    return FileCorpus(d.files)


def build_token_file(paths: List[str], tokenizer, cache_dir: str, workers: Optional[int] = None,
                     progress: Optional[bool] = None, rank: int = 0, world: int = 1) -> str:
    """`build_corpus_token_file` of local files (`FileCorpus`)."""
    return build_corpus_token_file(FileCorpus(paths), tokenizer, cache_dir, workers, progress, rank, world)


def build_corpus_token_file(corpus, tokenizer, cache_dir: str, workers: Optional[int] = None,
                            progress: Optional[bool] = None, rank: int = 0, world: int = 1) -> str:
    """Tokenise the corpus's documents ONCE into `<cache_dir>/<key>.tokens` (+ `.docs`, `.json`); returns the stem.

    Files: tokens (uint16 or uint32, every document followed by eos), docs (int64 start offset of each document).
    Written to a temporary name and renamed, so a crash or a concurrent reader never sees a partial file. If the
    stem already exists it is reused as is (key = the corpus's key, e.g. file paths, sizes and mtimes, and the
    tokenizer).
    workers: tokenising processes (default: the local cores shared by the local ranks for shares above 8 MB, 1 for
    the byte tokenizer); the file is the same for any number (`lsp.train.tokenizing`). progress: a tqdm bar
    (default: above 64 MB).
    rank / world: called by every rank, each tokenises its share of the documents (`corpus.documents(rank, world)`)
    into a part file, rank 0 joins the parts; all of them wait on files, not on a collective with a timeout
    (`join_rank_parts`). A corpus that cannot be split (a stream of unknown length) is tokenised by rank 0 alone.
    """
    os.makedirs(cache_dir, exist_ok=True)
    stem = os.path.join(cache_dir, hashlib.sha1((tokenizer.name + corpus.key()).encode()).hexdigest()[:16])
    if os.path.exists(stem + ".json") and _token_file_intact(stem):
        return stem
    workers = default_workers(corpus.size // world, tokenizer) if workers is None else workers
    if world == 1 or not corpus.splittable:
        part0 = rank_part(stem, 0, world)
        if rank == 0:
            documents, size = corpus.documents()
            with errors_shared(part0):
                write_token_file(stem, documents, tokenizer, corpus.names(), workers, progress_bar(size, progress))
        else:
            wait_for(lambda: os.path.exists(stem + ".json") and _token_file_intact(stem), "rank 0 to tokenise the "
                     "corpus", [part0])
        return stem
    part = rank_part(stem, rank, world)
    if not _token_file_intact(part):
        documents, size = corpus.documents(rank, world)
        bar = progress_bar(size, progress if rank == 0 else False)
        with errors_shared(part):   # a data error on one rank stops the others instead of leaving them waiting
            write_token_file(part, documents, tokenizer, corpus.names(), workers, bar)
    join_rank_parts(stem, rank, world)
    return stem


def join_rank_parts(stem: str, rank: int, world: int) -> None:
    """Rank 0: wait for every part, concatenate them in rank order into `stem`, remove them; the others: wait for
    `stem`. Document starts of part r are shifted by the tokens of the parts before it."""
    parts = [rank_part(stem, r, world) for r in range(world)]
    if rank != 0:
        wait_for(lambda: os.path.exists(stem + ".json") and _token_file_intact(stem), "rank 0 to join the token "
                 "parts", parts)
        return
    wait_for(lambda: all(os.path.exists(p + ".json") and _token_file_intact(p) for p in parts),
             "the other ranks' token parts", parts)
    metas = []
    for part in parts:
        with open(part + ".json") as f:
            metas.append(json.load(f))
    tmp = f"{stem}.{os.getpid()}.tmp"
    with open(tmp + ".tokens", "wb") as out:
        for part in parts:
            with open(part + ".tokens", "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    offsets = np.cumsum([0] + [m["num_tokens"] for m in metas])
    starts = [np.fromfile(p + ".docs", dtype=np.int64)[:-1] + off for p, off in zip(parts, offsets)]
    np.concatenate(starts + [offsets[-1:]]).astype(np.int64).tofile(tmp + ".docs")
    publish_token_file(tmp, stem, dict(metas[0], num_tokens=int(offsets[-1]),
                                       num_docs=sum(m["num_docs"] for m in metas)))
    for part in parts:
        for ext in (".tokens", ".docs", ".json"):
            os.remove(part + ext)


def write_token_file(stem: str, documents: Iterable[str], tokenizer, paths: List[str], workers: int, bar) -> None:
    """Tokens of the documents (each followed by eos) -> `stem`.tokens / .docs / .json, via temporary names."""
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    tmp = f"{stem}.{os.getpid()}.tmp"
    lengths, n = [], 0
    with open(tmp + ".tokens", "wb") as out:
        for tokens, doc_lengths, chars in encoded_batches(documents, tokenizer, workers):
            out.write(tokens.astype(dtype).tobytes())
            lengths.append(doc_lengths)
            n += len(tokens)
            if bar is not None:
                bar.update(chars)
    if bar is not None:
        bar.close()
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tofile(tmp + ".docs")   # starts + [n]
    meta = {"num_tokens": n, "num_docs": len(lengths), "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.name, "files": paths}
    publish_token_file(tmp, stem, meta)


def publish_token_file(tmp: str, stem: str, meta: dict) -> None:
    with open(tmp + ".json", "w") as f:
        json.dump(meta, f)
    os.replace(tmp + ".tokens", stem + ".tokens")
    os.replace(tmp + ".docs", stem + ".docs")
    os.replace(tmp + ".json", stem + ".json")     # last: its presence marks a complete token file


def _token_file_intact(stem: str) -> bool:
    """False when the cache was damaged after it was written (truncated/edited files): it is then rebuilt."""
    try:
        with open(stem + ".json") as f:
            meta = json.load(f)
        item = np.dtype(meta["dtype"]).itemsize
        return (os.path.getsize(stem + ".tokens") == meta["num_tokens"] * item
                and os.path.getsize(stem + ".docs") == 8 * (meta["num_docs"] + 1))
    except (OSError, ValueError, KeyError, TypeError):
        return False


class PackedTokens:
    """Fixed windows of seq_len + 1 tokens over the memory-mapped token stream, with document boundaries.

    Window i covers stream[i*T : i*T + T + 1]; input_ids = first T, labels = last T. A label that would cross from one
    document into the next is IGNORE_INDEX, and cu_seqlens marks every document start inside the window, so no
    attention state flows between documents. The last `val_fraction` of the windows is the validation split.
    """

    def __init__(self, stem: str, seq_len: int, val_fraction: float):
        with open(stem + ".json") as f:
            meta = json.load(f)
        self.vocab_size = meta["vocab_size"]
        self.seq_len = seq_len
        total = (meta["num_tokens"] - 1) // seq_len
        if total < 1:   # checked before mapping: an empty file cannot be memory-mapped
            raise ConfigError("data.files", f"the files hold {meta['num_docs']} documents, {meta['num_tokens']} "
                              f"tokens (with end-of-document ids): fewer than data.seq_len + 1 = {seq_len + 1}; "
                              "add data or lower data.seq_len")
        self.tokens = np.memmap(stem + ".tokens", dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
        self.doc_starts = np.fromfile(stem + ".docs", dtype=np.int64)   # [num_docs + 1]
        self.num_val = int(total * val_fraction)
        self.num_train = total - self.num_val
        if self.num_train < 1:
            raise ConfigError("data.val_fraction", "leaves no training sequence")

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # -> tokens [T], labels [T], cu_seqlens [N + 1]
        T, lo = self.seq_len, i * self.seq_len
        span = self.tokens[lo:lo + T + 1].astype(np.int64)
        tokens, labels = span[:-1].copy(), span[1:].copy()
        inner = self.doc_starts[(self.doc_starts > lo) & (self.doc_starts < lo + T)] - lo   # doc starts inside
        labels[inner - 1] = IGNORE_INDEX                     # last token of a document predicts nothing
        if lo + T in self.doc_starts:                        # next window starts a new document
            labels[T - 1] = IGNORE_INDEX
        cu = np.concatenate([[0], inner, [T]]).astype(np.int32)
        return tokens, labels, cu

    def sample(self, index: int, split: str = "train"):
        if split == "train":
            return self.window(index % self.num_train)
        return self.window(self.num_train + index % max(self.num_val, 1))


def pack_windows(samples) -> Batch:
    """micro_batch windows of packed files side by side in ONE row of micro_batch * T tokens (cu_seqlens needs
    B == 1), each window start also a sequence start: no state crosses windows, the loss averages the same labels,
    and RoPE depends only on distances inside a sequence, so this is the batch of B separate rows."""
    # samples: B x (tokens [T], labels [T], cu_seqlens [N_i + 1]) -> Batch [1, B*T], cu_seqlens [sum N_i + 1]
    T = len(samples[0][0])
    starts = [s[2][:-1] + i * T for i, s in enumerate(samples)]
    cu = np.concatenate([*starts, [len(samples) * T]]).astype(np.int32)
    tokens = np.concatenate([s[0] for s in samples])[None]
    labels = np.concatenate([s[1] for s in samples])[None]
    return Batch(torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(cu))


# --------------------------------------------------------------------------------------------------- loader
@dataclass
class DataState:
    step: int = 0          # optimizer steps already consumed; the only thing needed to resume


class DataLoader:
    """Global batch of step s = rows [s*G, (s+1)*G) of a seed-fixed permutation, G = dp * micro_batch * grad_accum.

    Rank (dp_rank) takes, for micro-step m, rows  s*G + m*dp*mb + dp_rank*mb + [0, mb). The composition of a global
    batch depends only on G, so a run resumes at a different dp size (with G unchanged) on the very same data.
    """

    def __init__(self, cfg: Config, dp_rank: int = 0, dp_size: int = 1):
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        d = cfg.data
        if d.kind == "mqar":
            self.source = MQAR(d, cfg.train.seed)
            self.epoch_len = None
        else:
            # the trainer built it already (every rank its share): here a no-op that returns the stem
            stem = build_corpus_token_file(corpus_of(d), make_tokenizer(d.tokenizer), d.cache_dir)
            self.source = PackedTokens(stem, d.seq_len, d.val_fraction)
            self.epoch_len = self.source.num_train
        self.vocab_size = self.source.vocab_size
        self.state = DataState()

    def _row(self, global_row: int) -> int:
        if self.epoch_len is None:
            return global_row
        epoch, pos = divmod(global_row, self.epoch_len)
        return shuffled_position(pos, self.epoch_len, self.cfg.train.seed, epoch)   # O(1), no permutation array

    def _collate(self, samples) -> Batch:
        if len(samples[0]) > 2:
            return pack_windows(samples)
        tokens = torch.from_numpy(np.stack([s[0] for s in samples]))
        labels = torch.from_numpy(np.stack([s[1] for s in samples]))
        return Batch(tokens, labels, None)

    def micro_batches(self, step: int) -> List[Batch]:
        """This dp rank's grad_accum micro-batches of optimizer step `step`."""
        t = self.cfg.train
        G = self.dp_size * t.micro_batch * t.grad_accum
        out = []
        for m in range(t.grad_accum):
            first = step * G + (m * self.dp_size + self.dp_rank) * t.micro_batch
            out.append(self._collate([self.source.sample(self._row(first + j)) for j in range(t.micro_batch)]))
        return out

    def eval_batches(self) -> List[Batch]:
        """Held-out batches (MQAR: fresh samples from the eval stream), split over dp ranks."""
        t, n = self.cfg.train, self.cfg.data.eval_batches
        return [self._collate([self.source.sample((b * self.dp_size + self.dp_rank) * t.micro_batch + j, "val")
                               for j in range(t.micro_batch)]) for b in range(n)]
