"""The built-in MQAR task (the default data, no files): sample i is a pure function of (seed, split, i)."""
from __future__ import annotations

import numpy as np

from lsp.names import IGNORE_INDEX
from lsp.run_config import DataConfig


class MQAR:
    """Multi-query associative recall (Zoology, Arora et al. 2023; Based, 2024).

    Token ids: 0 = filler, keys in [1, 1 + num_keys), values in [1 + num_keys, 1 + num_keys + num_values).
    A sequence of length T is `k_1 v_1 ... k_P v_P` (P distinct keys, random values) followed by filler in which Q of
    the keys are asked again at random even offsets, each followed by its value:  `... 0 0 k_j v_j 0 ...` (without
    repetition when Q <= P; more queries than pairs ask some keys repeatedly, for more recall targets per sequence).
    labels[t] = v_j exactly at the position t of a queried k_j (the model must predict the value it saw bound to
    that key), everything else is IGNORE_INDEX, so the loss and the accuracy are measured on recall only.
    """

    has_validation = True   # held-out samples are drawn fresh from their own stream

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
