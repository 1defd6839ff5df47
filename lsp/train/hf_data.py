"""data.kind=hf: a Hugging Face `datasets` corpus, tokenised into the same token file as local files.

    data:
      kind: hf
      hf: {path: data/my_dataset}                                  # a Dataset / DatasetDict saved with save_to_disk
      hf: {path: json, data_files: [a.jsonl, b.jsonl]}             # a builder over local files (json, csv, parquet,
                                                                   # text, arrow); streaming: true reads it lazily

The `datasets` package is an optional extra (pip install 'lsp-hybrid[datasets]'); without hub access only local data
works. A map-style dataset is split between ranks by rows (rank r tokenises rows [n r / W, n (r + 1) / W)), so the
joined token file equals one process's; a stream (streaming: true) has no length, so rank 0 tokenises it while the
others wait on the file. The cache key is the dataset's fingerprint (map-style) or the data files' paths, sizes and
mtimes (stream), with the split, the text field and the tokenizer.
"""
from __future__ import annotations

import os
from typing import Iterable, List

from lsp.run_config import ConfigError, HFDataConfig

BATCH_ROWS = 1024   # rows per Arrow read


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.kind", "hf needs the `datasets` package: pip install 'lsp-hybrid[datasets]'") from None
    datasets.disable_progress_bars()
    return datasets


def open_dataset(h: HFDataConfig):
    """The split of the configured dataset (Dataset, or IterableDataset when streaming); one-line ConfigError for a
    missing dataset, split or text field."""
    datasets = _datasets()
    try:
        if os.path.isdir(h.path):
            ds = datasets.load_from_disk(h.path)
            if isinstance(ds, datasets.DatasetDict):
                if h.split not in ds:
                    raise ConfigError("data.hf.split", f"{h.split!r} is not a split of {h.path} "
                                      f"(it has {', '.join(ds)})")
                ds = ds[h.split]
            ds = ds.to_iterable_dataset() if h.streaming else ds
        else:
            ds = datasets.load_dataset(h.path, data_files=list(h.data_files) or None, split=h.split,
                                       streaming=h.streaming)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the user needs its first line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError("data.hf.path", f"cannot load {h.path!r} (split {h.split!r}): {first}") from None
    columns = ds.column_names
    if columns is not None and h.text_field not in columns:
        raise ConfigError("data.hf.text_field", f"{h.text_field!r} is not a column of {h.path} "
                          f"(it has {', '.join(columns)})")
    return ds


class HFCorpus:
    """The corpus interface of `lsp.train.documents.FileCorpus` (key, names, documents, size, splittable) over a
    `datasets` split."""

    def __init__(self, h: HFDataConfig):
        self.h, self.ds = h, open_dataset(h)
        self.splittable = not h.streaming
        self.size = int(getattr(self.ds, "dataset_size", None) or 0) if self.splittable else 0

    def key(self) -> str:
        h = self.h
        if self.splittable:
            source = self.ds._fingerprint
        else:
            source = "".join(f"{os.path.abspath(p)}|{os.stat(p).st_size}|{os.stat(p).st_mtime_ns}"
                             for p in (h.data_files or [h.path]) if os.path.exists(p))
            source += "" if source else h.path
        return f"hf|{source}|{h.split}|{h.text_field}"

    def names(self) -> List[str]:
        return [f"hf:{self.h.path}:{self.h.split}:{self.h.text_field}"]

    def documents(self, rank: int = 0, world: int = 1):
        # -> (the texts of rank's rows, their share of the dataset size)
        ds, first = self.ds, 0
        if self.splittable and world > 1:
            n = len(ds)
            first = n * rank // world
            ds = ds.select(range(first, n * (rank + 1) // world))
        return self._texts(ds, first), self.size // world

    def _texts(self, ds, row: int) -> Iterable[str]:
        field = self.h.text_field
        for batch in ds.iter(batch_size=BATCH_ROWS):
            for text in batch[field]:
                if not isinstance(text, str):
                    raise ConfigError("data.hf.text_field", f"row {row} of {self.h.path}: {field!r} is "
                                      f"{type(text).__name__}, not a string")
                row += 1
                yield text
