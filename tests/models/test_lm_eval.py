"""lm-evaluation-harness on an exported lsp model (optional: `pip install lm-eval`, with the `hf` extra): a local
multiple-choice task (no hub access) run through lm-eval's own `hf` model on `lsp export`'s folder. A tiny model
trained on "the <animal> sat on the <place>." sentences must pick each animal's place (acc 1.0); the same questions
with the label on a wrong choice must score 0 (the metric reads the model's answer, not a constant)."""
import json
import os
import random

import pytest

pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

from tests.train.conftest import SMALL, TINY, run_lsp  # noqa: E402

PLACES = {"cat": "mat", "dog": "log", "fox": "box", "owl": "oak"}


def write_task(folder, name, label):
    rows = [{"context": f"the {a} sat on the", "choices": [" " + p] + [" " + q for q in PLACES.values() if q != p],
             "label": label} for a, p in PLACES.items()]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / f"{name}.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")


@pytest.mark.slow
def test_lm_eval_harness_runs_a_local_task_on_the_export(tmp_path, monkeypatch):
    from lsp.cli import main as lsp_main
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the {a} sat on the {PLACES[a]}. " for a in rng.choices(list(PLACES), k=600)))
    proc = run_lsp("train", TINY, f"out_dir={tmp_path}", "name=text", *SMALL, "parallel.sp=1", "model.hidden_size=64",
                   "data.seq_len=64", "train.micro_batch=8", "train.steps=400", "optim.lr=3e-3", "data.kind=files",
                   f"data.files=[{corpus}]", f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert lsp_main(["export", str(tmp_path / "text"), str(tmp_path / "hf")]) == 0
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, "lsp_where_sat", 0)
    write_task(tasks, "lsp_where_sat_wrong_label", 1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32",
        tasks=["lsp_where_sat", "lsp_where_sat_wrong_label"], device="cpu", batch_size=4,
        task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks)))
    assert out["results"]["lsp_where_sat"]["acc,none"] == 1.0
    assert out["results"]["lsp_where_sat_wrong_label"]["acc,none"] == 0.0
    assert os.path.isfile(tmp_path / "hf" / "modeling_lsp.py")
