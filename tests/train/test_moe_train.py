"""Training with expert parallelism: `configs/tiny-moe-cpu.yaml` (sp = ep = 2 on 2 gloo ranks) gives the losses and
gradient norms of the same model without EP (parallel.ep=1, sp=1, one process) step by step; its checkpoint (each
rank's experts, tests/train/test_moe_checkpoint.py) resumes bitwise at ep = 2 and loads at ep = 1. Bad `parallel.ep`
values are one line naming the key."""
import json
import os
import shutil

import pytest
import torch

from lsp.models.moe import parameter_counts
from lsp.run_config import ConfigError, load_config
from lsp.train import load_run
from lsp.train.trainer import Trainer

from .conftest import REPO, run_lsp

MOE = os.path.join(REPO, "configs", "tiny-moe-cpu.yaml")
STEPS = 6
COMMON = [f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "optim.warmup_steps=2",
          "data.eval_batches=2", "logging.tqdm=false", "checkpoint.every=3",
          "train.micro_batch=8"]


def read_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    proc = run_lsp("launch", "--nproc-per-node", "2", MOE, f"out_dir={out}", *COMMON, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(out, "tiny-moe-cpu"), proc


@pytest.mark.slow   # ~40 s on 2 shared cores
def test_ep2_and_ep1_training_match(ep2_run, tmp_path):
    run_dir, proc = ep2_run
    rows = read_losses(run_dir)
    trainer = Trainer(load_config(MOE, [f"out_dir={tmp_path}", "parallel.sp=1", "parallel.ep=1", *COMMON]))
    ref = [trainer.train_step() for _ in range(STEPS)]
    for a, b in zip(ref, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        # the expert gradients' reduction: a missing / 2 (mean instead of sum over the EP group) changes the norm
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert abs(ref[-1]["loss"] - ref[0]["loss"]) > 1e-3   # control: the tolerance resolves one step
    # the startup line counts the whole model (ep = 1's), not rank 0's expert shard
    total, active = parameter_counts(trainer.model)
    assert f"lsp: {total / 1e6:.2f}M params ({active / 1e6:.2f}M active), " in proc.stdout
    # per MoE layer metrics (global load over both ranks) and the load plot
    assert {"moe/0/load_max_over_mean", "moe/1/aux_loss", "moe/1/dropped"} <= set(rows[0])
    assert rows[0]["moe/0/load_max_over_mean"] >= 1.0 and rows[0]["moe/0/dropped"] == 0
    assert os.path.isfile(os.path.join(run_dir, "moe_load.png"))
    # the sharded checkpoint loads in one process as a plain model (lsp eval / generate / export)
    model, _ = load_run(run_dir)
    assert model.layers[0].mlp.experts.gate.shape[0] == 4
    assert model.generate(torch.tensor([[1, 2, 3]]), 3).shape == (1, 6)


@pytest.mark.slow   # reads the 2-rank run of `ep2_run`
def test_eval_generate_export_of_the_ep2_run(ep2_run, tmp_path, capsys):
    """`lsp eval`, `lsp generate` and `lsp export` read the ep = 2 run's sharded checkpoint in one process; the
    exported folder loads through transformers (where installed) with the logits and the greedy continuation of
    lsp's model."""
    from lsp.cli import main as lsp_main
    run_dir, _ = ep2_run
    assert lsp_main(["eval", run_dir]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert lsp_main(["generate", run_dir, "--prompt", "1 2 3 4", "--max-new-tokens", "4"]) == 0
    continued = [int(t) for t in capsys.readouterr().out.split()]
    out_dir = str(tmp_path / "hf")
    assert lsp_main(["export", run_dir, out_dir]) == 0
    try:
        import transformers
    except ImportError:
        return
    model, _ = load_run(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model.eval()(ids).logits)
        assert hf.generate(ids, max_new_tokens=4, do_sample=False)[0].tolist() == continued


@pytest.mark.slow   # a 2-rank run (~40 s on 2 shared cores)
@pytest.mark.parametrize("zero", [2, 3])
def test_fsdp_with_ep2_equals_ep1(tmp_path, zero):
    """FSDP2 (ZeRO-2, 3) with parallel.ep=2 on 2 gloo ranks (sp = ep = 2): the experts stay out of fully_shard and are
    reduced over their replicas; dense parameters are sharded by FSDP. Losses and grad norms equal the one-process
    ep = 1 run step by step (fp32; the gradient norm sums the FSDP shards and the expert shards); the checkpoint
    written at step 3 (sharded experts) loads as a plain model."""
    args = [*COMMON, "train.precision=fp32"]
    proc = run_lsp("launch", "--nproc-per-node", "2", MOE, f"out_dir={tmp_path}", *args, "parallel.engine=fsdp",
                   f"parallel.zero={zero}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = os.path.join(tmp_path, "tiny-moe-cpu")
    rows = read_losses(run_dir)
    trainer = Trainer(load_config(MOE, [f"out_dir={tmp_path}/ref", "parallel.sp=1", "parallel.ep=1", *args]))
    ref = [trainer.train_step() for _ in range(STEPS)]
    assert len(rows) == STEPS
    for a, b in zip(ref, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert abs(ref[-1]["loss"] - ref[0]["loss"]) > 1e-3   # control: the tolerance resolves one step
    model, _ = load_run(run_dir)
    assert model.layers[0].mlp.experts.gate.shape[0] == 4


@pytest.mark.slow   # two more 2-rank runs
def test_ep2_checkpoint_resumes_bitwise_and_loads_at_ep1(ep2_run, tmp_path):
    run_dir, _ = ep2_run
    rows = read_losses(run_dir)
    for ep in (2, 1):
        out = tmp_path / f"ep{ep}"
        ckpts = out / "tiny-moe-cpu" / "checkpoints"
        shutil.copytree(os.path.join(run_dir, "checkpoints", "step_00000003"), ckpts / "step_00000003")
        (ckpts / "latest").write_text("step_00000003\n")
        proc = run_lsp("launch", "--nproc-per-node", "2", MOE, f"out_dir={out}", *COMMON, f"parallel.ep={ep}",
                       timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        again = read_losses(out / "tiny-moe-cpu")
        assert [r["step"] for r in again] == [4, 5, 6]
        if ep == 2:
            assert [r["loss"] for r in again] == [r["loss"] for r in rows[3:]]   # bitwise
        else:
            assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in rows[3:]], rel=1e-5)


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.ep=3"], 2, "parallel.ep: 3 does not divide model.moe_experts=4"),
    (["parallel.ep=4"], 2, "parallel.ep: 4 does not divide the dp x sp ranks (2)"),
    (["parallel.ep=2", "model.moe_experts=0"], 2, "parallel.ep: 2 needs a mixture-of-experts model"),
    (["model.moe_top_k=5"], None, "model.moe_top_k: 5 > model.moe_experts=4"),
    (["model.moe_capacity_factor=0"], None, "model.moe_capacity_factor: must be > 0"),
    (["parallel.ep=0"], None, "parallel.ep: must be > 0"),
])
def test_bad_ep_and_moe_values_name_the_key(overrides, world, message):
    from lsp.run_config import validate
    with pytest.raises(ConfigError) as err:
        validate(load_config(MOE, overrides), world_size=world) if world else load_config(MOE, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_bad_ep_exits_2_with_one_line():
    proc = run_lsp("train", MOE, "parallel.ep=3", timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last == "config error: parallel.ep: 3 does not divide model.moe_experts=4", \
        proc.stderr
