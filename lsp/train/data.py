"""The training data loader over the built-in MQAR task (`mqar.py`, the default, no files) or packed text (local
files or a Hugging Face `datasets` corpus, tokenised once into a token file: `documents.py`, `token_file.py`,
`packed.py`).

Both sources are *indexable*: sample i is a pure function of (seed, i), so a batch is fixed by the global step, each
dp rank reads only its own rows, and resuming needs nothing but the step number (`DataState.step`).
Each rank then keeps only its sequence-parallel shard of the tokens (`sp.shard(x, dim=1)`, done by the trainer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from lsp.run_config import Config

from .documents import corpus_of
from .mqar import MQAR
from .packed import PackedTokens
from .shuffle import shuffled_position
from .token_file import build_corpus_token_file
from .tokenizer import make_tokenizer


@dataclass
class Batch:
    input_ids: torch.Tensor              # [B, T] long
    labels: torch.Tensor                 # [B, T] long, labels[t] = token t+1 or IGNORE_INDEX
    cu_seqlens: Optional[torch.Tensor]   # [N + 1] int32 global document boundaries (B == 1) or None


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

    @property
    def has_validation(self) -> bool:
        """False when the validation split of a text corpus rounds to zero windows (data.val_fraction=0, or a
        corpus of fewer than 1 / val_fraction windows): the run then trains without evaluation."""
        return self.source.has_validation

    def eval_batch(self, b: int) -> Batch:
        """Held-out batch b: samples [b * micro_batch, (b + 1) * micro_batch) of the eval stream (MQAR) or of the
        validation windows (text)."""
        mb = self.cfg.train.micro_batch
        return self._collate([self.source.sample(b * mb + j, "val") for j in range(mb)])

    def eval_batches(self) -> List[Tuple[Batch, bool]]:
        """This dp rank's share of the held-out set, (batch, counts) pairs. The set is data.eval_batches batches
        whatever dp is, so `lsp eval` (dp=1) reproduces the logged eval loss of any run; rank r takes batches r,
        r + dp, ... Every rank runs the same number of forwards (FSDP and DeepSpeed gather weights in each), so a
        rank with one batch fewer repeats batch 0, which does not count."""
        n, dp = self.cfg.data.eval_batches, self.dp_size
        mine = [i * dp + self.dp_rank for i in range(-(-n // dp))]   # ceil(n / dp) slots
        return [(self.eval_batch(b if b < n else 0), b < n) for b in mine]
