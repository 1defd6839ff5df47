"""The cost model and planner choose the softmax layers' SP method (LASP-2H or ring attention) per config: ring at
8M tokens on 256 ranks (LASP-2H's gathered K|V does not fit, or costs far more time), LASP-2H at 32K on 8 (both
fit; ring's per-step synchronisation costs more than the gather it saves); the modelled bytes are what the code
sends."""
import os

import pytest
import torch

from lsp.names import SOFTMAX_SP_METHODS
from lsp.parallel import SPContext, comm_stats, reset_comm_stats, softmax_methods
from lsp.plan.costmodel import Hardware, softmax_exchange_cost
from lsp.plan.planner import Cluster, activation_bytes, plan_cluster, recommend
from lsp.run_config import hybrid_config, load_config

from ..parallel.cases import make_softmax_case, run_sp_softmax
from .conftest import REPO

M = 2**20
CONFIGS = ("hybrid-gdn-1.3b-128k", "hybrid-1.3b-1m-multinode")


def _cfg(name):
    return load_config(os.path.join(REPO, "configs", f"{name}.yaml"), [], check_files=False)


def _pair(rows, best):
    # the best candidate under each softmax method, everything else equal
    return {c.softmax_method: c for c in rows if (c.sp, c.method, c.micro_batch, c.checkpointing)
            == (best.sp, best.method, best.micro_batch, best.checkpointing)}


@pytest.mark.parametrize("name", CONFIGS)
def test_planner_picks_ring_at_8m_tokens_on_256_ranks(name):
    """sp = 256 (32K tokens per rank): ring is chosen; LASP-2H keeps 4·Hkv·Dh bytes per global token per softmax
    layer more (and its gathered K|V's gradient while a layer runs backward), and exposes far more communication."""
    cfg = _cfg(name)
    rows = plan_cluster(cfg, Cluster(gpus=256), vocab_size=257, seq_len=8 * M, sp_choices=[256])
    best = rows[0]
    assert best.fits and best.softmax_method == "ring"
    pair = _pair(rows, best)
    m = hybrid_config(cfg, 257)
    gathered = 4 * m.num_kv_heads * m.head_dim * 8 * M        # one softmax layer's gathered bf16 K|V
    assert (pair["allgather"].memory_gb - pair["ring"].memory_gb) * 1e9 > gathered
    assert pair["allgather"].comm_s > 10 * pair["ring"].comm_s
    assert recommend(cfg, Cluster(gpus=256), vocab_size=257, seq_len=8 * M).softmax_method == "ring"


@pytest.mark.parametrize("name", CONFIGS)
def test_planner_keeps_lasp2h_at_32k_tokens_on_8_ranks(name):
    """sp = 8 (4K tokens per rank): both fit; LASP-2H's one gather hides partly behind the diagonal block, while
    each of ring's 7 + 7 + 1 dependent hops exposes α + γ = 70 µs, so LASP-2H is modelled faster."""
    rows = plan_cluster(_cfg(name), Cluster(gpus=8), vocab_size=257, seq_len=32 * 1024, sp_choices=[8])
    best = rows[0]
    assert best.fits and best.softmax_method == "allgather"
    pair = _pair(rows, best)
    assert pair["ring"].fits and pair["ring"].step_s > pair["allgather"].step_s


@pytest.mark.parametrize("checkpointing", [False, True])
def test_modelled_ring_memory_does_not_grow_with_the_global_length(checkpointing):
    """Activations at 32K tokens per rank: ring's are the same at 8M on 256 and 16M on 512 ranks; LASP-2H's grow
    by the extra 8M tokens' K|V for every softmax layer kept (one under checkpointing) plus its gradient buffer."""
    m = hybrid_config(_cfg("hybrid-gdn-1.3b-128k"), 257)
    per_rank = 32 * 1024

    def act(world, method):
        return activation_bytes(m, world * per_rank, per_rank, 1, checkpointing, "zigzag", method)
    assert act(256, "ring") == act(512, "ring")
    kept = 1 if checkpointing else m.layer_types.count("S")
    growth = 4 * m.num_kv_heads * m.head_dim * 256 * per_rank * (kept + 1)
    assert act(512, "allgather") - act(256, "allgather") == pytest.approx(growth)


def test_modelled_ring_bytes_are_what_the_code_sends():
    """fp32 K|V (act_bytes 4, so the dK|dV accumulator is as large as K|V): the cost model's bytes per rank for
    a forward + backward equal comm_stats() of the emulated ring at W = 4."""
    W, B, T_local, Hkv, D = 4, 2, 16, 2, 8
    reset_comm_stats()
    run_sp_softmax(make_softmax_case(W, False, dtype=torch.float32),
                   SPContext(emulate=W, layout="zigzag", softmax_method="ring"))
    recv = sum(s["bytes_recv"] for k, s in comm_stats()["by_tag_op"].items() if k.startswith("softmax_ring")) / W
    kv = 2 * B * T_local * Hkv * D * 4
    assert softmax_exchange_cost("ring", W, kv, 1.0, 0.0, Hardware(act_bytes=4)).bytes == recv


def test_cost_registry_matches_the_method_names():
    assert softmax_methods() == SOFTMAX_SP_METHODS
    with pytest.raises(ValueError, match="softmax method must be one of"):
        softmax_exchange_cost("lasp2h", 4, 1.0, 1.0, 0.0)


def test_a_softmax_method_without_its_cost_formula_is_refused():
    """The softmax family's registry takes a method only with its cost formula (what the planner prices it by)."""
    from lsp.parallel import register_softmax_method

    with pytest.raises(ValueError, match="softmax SP method 'toy': cost must be callable"):
        register_softmax_method("toy", cost=None)(lambda q, k, v, sp, causal, scale, cu_seqlens: q)
    assert "toy" not in softmax_methods()
