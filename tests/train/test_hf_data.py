"""data.kind=hf: a Hugging Face `datasets` corpus gives the token file the same texts give as local files, from a
save_to_disk directory, a json builder over local files, or a stream, in one process or split over ranks."""
import json
import sys

import numpy as np
import pytest

from lsp.run_config import ConfigError, HFDataConfig, load_config
from lsp.train.token_file import build_corpus_token_file, build_token_file
from lsp.train.tokenizer import make_tokenizer

from .conftest import SMALL
from .test_data_scale import read_token_file

datasets = pytest.importorskip("datasets")


@pytest.fixture
def texts():
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over lazy dog naïve café 文字".split()
    return [" ".join(rng.choice(words, rng.integers(1, 40))) for _ in range(120)]


@pytest.fixture
def reference(texts, tmp_path):
    # the files path on the same texts: what every hf variant must reproduce token for token
    path = tmp_path / "ref.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return read_token_file(build_token_file([str(path)], make_tokenizer("byte"), str(tmp_path / "ref"), workers=1,
                                            progress=False))


def _corpus(h):
    from lsp.train.hf_data import HFCorpus
    return HFCorpus(h)


def _tokens(h, cache):
    return read_token_file(build_corpus_token_file(_corpus(h), make_tokenizer("byte"), cache, workers=1,
                                                   progress=False))


def test_saved_dataset_json_builder_and_stream_equal_the_files_path(texts, reference, tmp_path):
    disk = tmp_path / "disk"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts, "id": list(range(len(texts)))})}) \
        .save_to_disk(str(disk))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts), encoding="utf-8")
    variants = [HFDataConfig(path=str(disk), text_field="body"),
                HFDataConfig(path=str(disk), text_field="body", streaming=True),
                HFDataConfig(path="json", data_files=[str(jsonl)], text_field="body"),
                HFDataConfig(path="json", data_files=[str(jsonl)], text_field="body", streaming=True)]
    for i, h in enumerate(variants):
        assert _tokens(h, str(tmp_path / f"c{i}")) == reference, h
    # control: the comparison sees document order
    swapped = datasets.Dataset.from_dict({"body": texts[1:2] + texts[:1] + texts[2:]})
    swapped.save_to_disk(str(tmp_path / "swapped"))
    assert _tokens(HFDataConfig(path=str(tmp_path / "swapped"), text_field="body"), str(tmp_path / "s")) != reference


@pytest.mark.parametrize("streaming", [False, True])
def test_ranks_build_what_one_process_builds(texts, reference, tmp_path, streaming):
    disk = tmp_path / "disk"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(disk))
    h = HFDataConfig(path=str(disk), streaming=streaming)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(3) as pool:   # every "rank" in a thread, all at once, sharing only the cache directory
        futures = [pool.submit(build_corpus_token_file, _corpus(h), make_tokenizer("byte"), str(tmp_path / "c"), 1,
                               False, r, 3) for r in range(3)]
        stems = [f.result() for f in futures]
    assert len(set(stems)) == 1 and read_token_file(stems[0]) == reference


def test_bad_hf_input_is_one_line(texts, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:3] + [None]})}).save_to_disk(str(disk))
    cases = [(HFDataConfig(path=str(disk), text_field="body"), "data.hf.text_field: 'body' is not a column"),
             (HFDataConfig(path=str(disk), split="validation"), "data.hf.split: 'validation' is not a split"),
             (HFDataConfig(path=str(tmp_path / "nowhere")), "data.hf.path: cannot load"),
             (HFDataConfig(path=str(disk)), "data.hf.text_field: row 3 of")]
    for h, start in cases:
        with pytest.raises(ConfigError) as err:
            _tokens(h, str(tmp_path / "c"))
        assert str(err.value).startswith(start) and "\n" not in str(err.value), str(err.value)
    monkeypatch.setitem(sys.modules, "datasets", None)   # the package not installed
    with pytest.raises(ConfigError, match=r"^data.kind: hf needs the `datasets` package"):
        _corpus(HFDataConfig(path=str(disk)))


def test_config_keys():
    cfg = load_config(None, SMALL + ["data.kind=hf", "data.hf.path=json", "data.hf.data_files=[]",
                                     "data.hf.streaming=true"], check_files=False)
    assert cfg.data.hf.streaming is True and cfg.data.hf.text_field == "text"
    with pytest.raises(ConfigError, match=r"^data.hf.path: data.kind=hf needs"):
        load_config(None, SMALL + ["data.kind=hf"], check_files=False)
    with pytest.raises(ConfigError, match=r"^data.hf.data_files: file not found: /no/such.jsonl"):
        load_config(None, SMALL + ["data.kind=hf", "data.hf.path=json", "data.hf.data_files=[/no/such.jsonl]"])


def test_training_on_an_hf_dataset(texts, tmp_path):
    from lsp.train.trainer import Trainer
    datasets.Dataset.from_dict({"text": texts * 2}).save_to_disk(str(tmp_path / "disk"))
    cfg = load_config(None, SMALL + ["data.kind=hf", f"data.hf.path={tmp_path / 'disk'}", "train.micro_batch=1",
                                     f"data.cache_dir={tmp_path}/c", "data.seq_len=64", f"out_dir={tmp_path}",
                                     "train.steps=6", "optim.lr=3e-3"])
    result = Trainer(cfg).fit()
    assert result["losses"][-1] < result["losses"][0] and "eval_loss" in result
