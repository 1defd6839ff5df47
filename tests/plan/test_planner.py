"""`lsp plan` (lsp.plan.planner): the recommendation fits, is the fastest fitting candidate, keeps the global batch,
and the model moves the way the algorithms do (memory per GPU falls with sp, checkpointing trades time for memory,
All-Scan wins where the published numbers say it does)."""
import os
import re

import pytest

from lsp.engines import engine_spec
from lsp.plan.planner import Cluster, _layer_weights, activation_bytes, plan_cluster, recommend
from lsp.run_config import ConfigError, hybrid_config, load_config

from .conftest import REPO

ONE_NODE = os.path.join(REPO, "configs", "hybrid-1.3b-128k.yaml")
MULTINODE = os.path.join(REPO, "configs", "hybrid-1.3b-1m-multinode.yaml")
M = 2**20


def test_recommendation_is_fastest_fitting_and_keeps_the_batch():
    cfg = load_config(ONE_NODE, [], check_files=False)
    cluster = Cluster(gpus=8)
    rows = plan_cluster(cfg, cluster, vocab_size=257)
    best = recommend(cfg, cluster, vocab_size=257)
    assert best.fits and best.memory_gb <= cluster.memory_gb
    assert all(best.tokens_per_s_per_gpu >= c.tokens_per_s_per_gpu for c in rows if c.fits)
    batch = cfg.train.micro_batch * cfg.train.grad_accum * 1     # dp = 8 GPUs / sp 8
    assert {c.micro_batch * c.grad_accum * c.dp for c in rows} == {batch}
    assert {c.micro_batch for c in rows} == {1}                  # packed files: one sequence per micro-batch
    assert {c.sp for c in rows} == {1, 2, 4, 8}


def test_memory_falls_with_sp_and_checkpointing_trades_time_for_memory():
    cfg = load_config(ONE_NODE, [], check_files=False)
    rows = plan_cluster(cfg, Cluster(gpus=8, memory_gb=1e9), vocab_size=257)
    pick = {(c.sp, c.checkpointing, c.method): c for c in rows}
    mem = [pick[(sp, False, "allgather")].memory_gb for sp in (1, 2, 4, 8)]
    assert mem == sorted(mem, reverse=True) and mem[0] > 2 * mem[-1]
    for sp in (1, 8):
        plain, ckpt = pick[(sp, False, "allgather")], pick[(sp, True, "allgather")]
        assert ckpt.memory_gb < plain.memory_gb
        assert ckpt.compute_s == pytest.approx(plain.compute_s * 4 / 3)


def test_activation_model_counts_the_gathered_kv_of_softmax_layers():
    cfg = load_config(ONE_NODE, [], check_files=False)
    m = hybrid_config(cfg, 257)
    T = 128 * 1024
    a8, a16 = activation_bytes(m, T, T // 8, 1, False), activation_bytes(m, T, T // 16, 1, False)
    # the part that does not shrink with sp: every rank keeps the gathered bf16 K|V of the whole sequence for its
    # softmax layers, the entering states of its two zigzag segments for its linear layers, a bf16 copy of every
    # weight and the fused cross-entropy's fp32 weight gradient; plus, while one softmax layer runs its backward,
    # the gradient of its gathered K|V (the working set of LASP-2H)
    types, H, Dh = m.layer_types, m.num_heads, m.head_dim
    weights = 2 * sum(_layer_weights(m, t) for t in types)
    kv = 2 * T * m.num_kv_heads * Dh * 2 * types.count("S")
    states = 2 * 4 * H * Dh * Dh * types.count("L")
    workspace = 2 * T * m.num_kv_heads * Dh * 2
    fixed = weights + kv + states + 4 * m.vocab_size * m.hidden_size + workspace
    assert a8 - a16 == pytest.approx((a8 - fixed) / 2)             # the local part halves, the rest does not
    assert a8 - a16 != pytest.approx((a8 - fixed + kv) / 2)         # negative control: K|V counted per local token
    assert activation_bytes(m, T, T // 8, 1, True) < a8 / 4        # checkpointing keeps block inputs + one block
    assert engine_spec("fsdp").state_bytes_per_param(3, 8) == 2.0
    assert engine_spec("ddp").state_bytes_per_param(0, 8) == 16.0 + 4.0   # + the all-reduce buckets


def test_allscan_wins_at_scale_and_nothing_fits_is_one_line():
    cfg = load_config(MULTINODE, [], check_files=False)
    # 141 GB GPUs: at 8M tokens every rank keeps the keys of the whole sequence for its softmax layers
    best = recommend(cfg, Cluster(gpus=256, memory_gb=141), vocab_size=257, seq_len=8 * M)
    assert best.method == "allscan" and best.sp > 8                # the sequence needs more than one node
    rows = plan_cluster(cfg, Cluster(gpus=256, memory_gb=141), vocab_size=257, seq_len=8 * M, sp_choices=[best.sp])
    by = {c.method: c.step_s for c in rows
          if c.checkpointing == best.checkpointing and c.softmax_method == best.softmax_method}
    assert by["allscan"] < by["allgather"] < by["ring"]
    with pytest.raises(ConfigError, match=r"^plan: no candidate fits in 16 GB per GPU; the smallest needs"):
        recommend(cfg, Cluster(gpus=32, memory_gb=16), vocab_size=257)


def test_plan_command(capsys):
    from lsp.cli import main
    assert main(["plan", MULTINODE]) == 0                        # data files are not needed to plan
    out = capsys.readouterr().out
    assert "seq_len=1048576, 32 GPUs x 80 GB" in out
    rec = re.search(r"recommended \(.* tokens/s/GPU, .* GB/GPU\): (.*)\n", out).group(1)
    assert re.fullmatch(r"parallel.sp=\d+ parallel.dp=\d+ "
                        r"parallel.sp_method=(allgather|ring|allscan parallel.scan_blocks=\d+) "
                        r"parallel.softmax_method=(allgather|ring) "
                        r"train.micro_batch=\d+ train.grad_accum=\d+ train.activation_checkpointing=(true|false)", rec)
    assert load_config(MULTINODE, rec.split(), check_files=False)   # the advice is a valid override list
    assert main(["plan", MULTINODE, "--gpus", "64", "--seq-len", str(2 * M)]) == 0
    assert "seq_len=2097152, 64 GPUs" in capsys.readouterr().out
    assert main(["plan", MULTINODE, "parallel.sp_method=foo"]) == 2
    assert main(["plan", MULTINODE, "--gpu-mem-gb", "16"]) == 2
    assert main(["plan", MULTINODE, "--gpus", "3", "--world", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and err[1].startswith("config error: plan: no candidate fits")
