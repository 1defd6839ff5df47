"""The MoE figures of `lsp plan` (lsp/plan/moe.py) against hand counts, and expert parallelism in the planner's
memory: ep shards exactly the routed experts' states."""
import os

import pytest

from lsp.cli import main
from lsp.models import HybridLM
from lsp.models.flops import expert_parameters
from lsp.plan.moe import moe_figures
from lsp.plan.planner import Cluster, model_parameters, plan_cluster
from lsp.run_config import hybrid_config, load_config

from .conftest import REPO

MOE = os.path.join(REPO, "configs", "tiny-moe-cpu.yaml")
BIG = os.path.join(REPO, "configs", "hybrid-moe-a1b-7b-128k.yaml")


def test_moe_figures_by_hand():
    cfg = load_config(MOE, ["model.vocab_size=81"])
    mcfg = hybrid_config(cfg, 81)
    # 2 MoE blocks, 4 experts of width 64 at D = 64; top-2 + 1 shared
    expert = 3 * 64 * 64
    assert expert_parameters(mcfg) == 2 * 4 * expert
    model = HybridLM(mcfg)
    assert model_parameters(mcfg) == sum(p.numel() for p in model.parameters())   # every expert counted
    f = moe_figures(mcfg, ep=2, sp=2, micro_batch=16, grad_accum=1, seq_len=64)
    assert f.total_params - f.active_params == 2 * (4 - 2) * expert            # the unused experts of each block
    assert f.params_per_gpu == f.total_params - 4 * expert                     # half of the 8 routed experts
    # 16·32 local tokens, 2 picks each, half of them leave; D = 64 bf16 values; 4 passes; 2 MoE blocks
    assert f.all_to_all_gb_per_step * 1e9 == pytest.approx(2 * 4 * 16 * 32 * 2 * 0.5 * 64 * 2)
    assert moe_figures(mcfg, ep=1, sp=2, micro_batch=16, grad_accum=1, seq_len=64).all_to_all_gb_per_step == 0


def test_planner_memory_shards_the_experts_over_ep():
    rows = {}
    for ep in (1, 2):
        cfg = load_config(MOE, [f"parallel.ep={ep}"])
        rows[ep] = {(c.sp, c.micro_batch, c.checkpointing, c.method): c.memory_gb
                    for c in plan_cluster(cfg, Cluster(gpus=2), vocab_size=81)}
    experts = expert_parameters(hybrid_config(load_config(MOE), 81))
    for key, gb in rows[1].items():   # 16 B of states per expert parameter, half of them on another GPU
        assert gb - rows[2][key] == pytest.approx(16 * experts / 2 / 1e9)


def test_plan_command_prints_the_moe_table(capsys):
    assert main(["plan", BIG, "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "| MoE (ep=8) | total params | active params |" in out
    assert "| | 6.886B | 1.189B | 6.512B | 1.189B |" in out
