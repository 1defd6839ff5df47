"""The token file of a corpus: its documents tokenised ONCE into `<cache_dir>/<key>.tokens` (+ `.docs`, `.json`),
every rank tokenising its share; written under temporary names and renamed, so no reader sees a partial file."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Iterable, List, Optional

import numpy as np

from .documents import FileCorpus
from .tokenizing import default_workers, encoded_batches, errors_shared, progress_bar, rank_part, wait_for


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
