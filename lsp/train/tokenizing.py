"""Parallel tokenisation for `build_token_file`: documents in, token arrays out, in corpus order.

Documents are grouped into batches of about `batch_chars` characters; a pool of worker processes (fork, so the
tokenizer is inherited, not re-loaded) encodes them while the caller writes finished batches to the memmap file.
At most 2 x workers batches are in flight, so memory stays bounded whatever the corpus size, and results are
consumed in submission order, so the token file is byte-identical to a serial run's.

Across ranks (`build_token_file(..., rank, world)`): rank r tokenises the documents that start in its 1/world of
the corpus bytes into a part file; rank 0 joins the parts in rank order (the same bytes as one process would
write). Ranks coordinate through the files of the shared cache directory, polling without a timeout, so no
collective times out however long a corpus takes; a data error on one rank reaches the others as a file.
"""
from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from .files import write_text_atomic

BATCH_CHARS = 1 << 22          # ~4 MB of text per task: big enough to hide the pickling, small enough to stream
SERIAL_BELOW_BYTES = 8 << 20   # a pool costs more than it saves on a corpus smaller than this

_worker_tokenizer = None


def encode_batch(tokenizer, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """-> (tokens of every document followed by eos, concatenated) int64 [N], (document lengths) int64 [D].
    Uses the tokenizer's `encode_array` when it has one (the byte tokenizer: no Python int per byte)."""
    encode = getattr(tokenizer, "encode_array", None) or (lambda t: np.asarray(tokenizer.encode(t), dtype=np.int64))
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    arrays = [encode(text) for text in texts]
    lengths = np.fromiter((len(a) + 1 for a in arrays), dtype=np.int64, count=len(arrays))
    if not arrays:
        return np.zeros(0, dtype=np.int64), lengths
    return np.concatenate([x for a in arrays for x in (a, eos)]).astype(np.int64, copy=False), lengths


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


def default_workers(total_bytes: int, tokenizer=None) -> int:
    """1 below SERIAL_BELOW_BYTES or for a tokenizer with a bulk `encode_array` (the byte tokenizer: shipping the
    text to a worker costs more than encoding it), else this rank's share of the local cores (LOCAL_WORLD_SIZE is
    set by torchrun)."""
    if total_bytes < SERIAL_BELOW_BYTES or hasattr(tokenizer, "encode_array"):
        return 1
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


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


# ------------------------------------------------------------------------------------------ across ranks
def rank_byte_range(total_bytes: int, rank: int, world: int) -> Tuple[int, Optional[int]]:
    """Rank r's share [lo, hi) of the corpus bytes (hi None for the last rank: to the end)."""
    return total_bytes * rank // world, None if rank == world - 1 else total_bytes * (rank + 1) // world


def rank_part(stem: str, rank: int, world: int) -> str:
    return f"{stem}.part{rank}of{world}"


@contextlib.contextmanager
def errors_shared(part: str):
    """A data error (ConfigError) while writing this rank's part is also left in `<part>.error`, where the ranks
    waiting for the part read it and stop with the same line (the corpus bytes decide it, so it never goes stale)."""
    from lsp.run_config import ConfigError
    try:
        yield
    except ConfigError as err:
        # whole or not at all: a rank polling for it must never read a half-written file (JSONDecodeError)
        write_text_atomic(part + ".error", json.dumps({"key": err.key, "message": str(err)[len(err.key) + 2:]
                                                       if err.key else str(err)}))
        raise


def wait_for(ready: Callable[[], bool], what: str, parts: List[str], poll_s: float = 0.2) -> None:
    """Poll the file system until ready(); no timeout (a rank that dies ends the launch through torchrun), a line
    every minute, and the error of a rank that failed on the data."""
    from lsp.run_config import ConfigError
    start = last = time.monotonic()
    while not ready():
        for part in parts:
            if os.path.exists(part + ".error"):
                with open(part + ".error") as f:
                    err = json.load(f)
                raise ConfigError(err["key"], err["message"])
        if time.monotonic() - last > 60:
            last = time.monotonic()
            print(f"lsp: waiting for {what} ({last - start:.0f} s)", file=sys.stderr, flush=True)
        time.sleep(poll_s)
