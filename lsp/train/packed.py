"""Packed text: fixed windows over the memory-mapped token file, with document boundaries and a validation split."""
from __future__ import annotations

import json

import numpy as np

from lsp.names import IGNORE_INDEX
from lsp.run_config import ConfigError


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

    @property
    def has_validation(self) -> bool:
        return self.num_val > 0

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
        assert self.has_validation, "no validation windows: callers check DataLoader.has_validation"
        return self.window(self.num_train + index % self.num_val)
