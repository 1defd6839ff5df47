"""The documents of a text corpus: local .txt / .jsonl files (`FileCorpus`) or a Hugging Face `datasets` corpus
(`hf_data.HFCorpus`); ranks split a corpus by byte ranges (files) or rows (datasets) without splitting a document."""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional

from lsp.run_config import ConfigError, DataConfig

from .tokenizing import rank_byte_range


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
