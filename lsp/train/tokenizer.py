"""The tokenizers a run can use, chosen by `data.tokenizer`: UTF-8 bytes (`byte`), a `tokenizers` JSON file, and,
for the MQAR task (no text), token ids written as text."""
from __future__ import annotations

import hashlib
from typing import List

import numpy as np

from lsp.run_config import ConfigError


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
