"""Packed files with micro_batch > 1 (the tiny config's 16, the schema default 8): the windows go side by side into
one row, each a sequence of its own, and the loss equals the mean over the same labels of separate windows."""
import json

import numpy as np
import torch

from lsp.models.build import build_model
from lsp.names import IGNORE_INDEX
from lsp.run_config import load_config
from lsp.train.data import DataLoader

from .conftest import SMALL


def test_files_micro_batch_is_separate_windows(tmp_path):
    words = "the of and to in is was for on that with as by at from".split()
    rng = np.random.default_rng(0)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 12)))}) + "\n"
                            for _ in range(60)))
    cfg = load_config(None, SMALL + ["data.kind=files", f"data.files=[{path}]", "train.micro_batch=3",
                                     f"data.cache_dir={tmp_path}/c", "data.seq_len=32", "model.layer_pattern=LS"])
    loader = DataLoader(cfg)
    (batch,) = loader.micro_batches(0)
    T = 32
    assert batch.input_ids.shape == (1, 3 * T)
    windows = [loader.source.window(loader._row(j)) for j in range(3)]
    assert batch.input_ids[0].tolist() == [t for w in windows for t in w[0].tolist()]
    assert {0, T, 2 * T, 3 * T} <= set(batch.cu_seqlens.tolist())           # every window starts a sequence
    torch.manual_seed(0)
    model = build_model(cfg, loader.vocab_size).double()
    packed = model(batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens).loss
    # independent reference: each window alone (B = 1, its own documents), mean over all their labels
    sums = counts = 0.0
    for tokens, labels, cu in windows:
        n = int((labels != IGNORE_INDEX).sum())
        out = model(torch.from_numpy(tokens)[None], labels=torch.from_numpy(labels)[None],
                    cu_seqlens=torch.from_numpy(cu))
        sums, counts = sums + out.loss * n, counts + n
    assert torch.allclose(packed, sums / counts, rtol=1e-10, atol=0)
    # negative control: without the window starts, state and attention leak across windows
    leaky = torch.tensor(sorted(set(batch.cu_seqlens.tolist()) - {T, 2 * T}), dtype=torch.int32)
    wrong = model(batch.input_ids, labels=batch.labels, cu_seqlens=leaky).loss
    assert not torch.allclose(wrong, sums / counts, rtol=1e-6, atol=0)
