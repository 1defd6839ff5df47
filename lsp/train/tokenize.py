"""Parallel tokenisation for `build_token_file`: documents in, token arrays out, in corpus order.

Documents are grouped into batches of about `batch_chars` characters; a pool of worker processes (fork, so the
tokenizer is inherited, not re-loaded) encodes them while the caller writes finished batches to the memmap file.
At most 2 x workers batches are in flight, so memory stays bounded whatever the corpus size, and results are
consumed in submission order, so the token file is byte-identical to a serial run's.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import os
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np

BATCH_CHARS = 1 << 22          # ~4 MB of text per task: big enough to hide the pickling, small enough to stream
SERIAL_BELOW_BYTES = 8 << 20   # a pool costs more than it saves on a corpus smaller than this

_worker_tokenizer = None


def encode_batch(tokenizer, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """-> (tokens of every document followed by eos, concatenated) int64 [N], (document lengths) int64 [D]."""
    seqs = [tokenizer.encode(text) + [tokenizer.eos_id] for text in texts]
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    tokens = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(lengths.sum()))
    return tokens, lengths


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    return encode_batch(_worker_tokenizer, texts)


def batches(documents: Iterable[str], batch_chars: Optional[int] = None) -> Iterator[List[str]]:
    batch_chars = batch_chars or BATCH_CHARS
    batch, size = [], 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def default_workers(total_bytes: int) -> int:
    return 1 if total_bytes < SERIAL_BELOW_BYTES else (os.cpu_count() or 1)


def encoded_batches(documents: Iterable[str], tokenizer, workers: int,
                    batch_chars: Optional[int] = None) -> Iterator[Tuple[np.ndarray, np.ndarray, int]]:
    """(tokens, lengths, characters consumed) per batch of documents, in corpus order, with `workers` processes."""
    if workers <= 1:
        for texts in batches(documents, batch_chars):
            yield (*encode_batch(tokenizer, texts), sum(map(len, texts)))
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: collections.deque = collections.deque()
        for texts in batches(documents, batch_chars):
            pending.append((pool.apply_async(_encode_in_worker, (texts,)), sum(map(len, texts))))
            if len(pending) >= 2 * workers:
                result, chars = pending.popleft()
                yield (*result.get(), chars)
        while pending:
            result, chars = pending.popleft()
            yield (*result.get(), chars)


def progress_bar(total_bytes: int, enabled: Optional[bool]):
    """A tqdm bar over the corpus bytes (shown by default for corpora above 64 MB), or None."""
    if enabled is False or (enabled is None and total_bytes < (64 << 20)):
        return None
    import sys

    from tqdm import tqdm
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenising", file=sys.stderr,
                dynamic_ncols=True)
