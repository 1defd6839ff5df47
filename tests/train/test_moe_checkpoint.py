"""Checkpoints of expert-parallel runs: each rank writes only its own experts (weights and AdamW moments) as row
blocks of the whole [E, ...] tensors, nothing is gathered, and a checkpoint loads at another ep size: ep = 2 -> 1
(`lsp eval` / `generate` / `export` and a one-process resume), 1 -> 2 (also the format of checkpoints written before
experts were sharded: whole expert tensors), 2 -> 2 and 2 -> 4. Over gloo ranks these are `slow` (the two ranks
import DCP: ~25 s); the default suite runs one rank of two on torch's fake process group, planning its save and
reading a whole-expert checkpoint per rank (DCP's no_dist mode), and the pure `balanced_writes`.

Reference: the same model after one AdamW step on seeded gradients of the whole model, in one process (ep = 1).
AdamW is elementwise, so a rank's experts after the step are bitwise the rows of the reference's: every comparison
is exact. Control: the model a load starts from differs from the reference, so an entry the load skipped is caught.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lsp.models import HybridConfig, HybridLM
from lsp.models.moe import expert_parameter_names
from lsp.parallel import spawn
from lsp.train.checkpoint import BalancedSavePlanner, load_checkpoint, load_model_state, model_mismatch, save_checkpoint
from lsp.train.dist import Mesh

CFG = dict(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, layer_pattern="LS", moe_experts=8,
           moe_top_k=2, moe_intermediate_size=12, moe_shared_experts=1)
MOMENTS = ("exp_avg", "exp_avg_sq")


def trained(rank=0, world=1, ep=1, seed=0):
    """(model, AdamW, ExpertParallel or None) after one step on the whole model's seeded gradients; under ep > 1 the
    model keeps this rank's experts and their gradients' rows."""
    torch.manual_seed(seed)
    model = HybridLM(HybridConfig(**CFG))
    gen = torch.Generator().manual_seed(seed + 1)   # the moments depend on the gradients only
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    experts = None
    if ep > 1:
        from lsp.train.expert_parallel import ExpertParallel
        mesh = Mesh(rank=rank, world=world, dp=world, sp=1, dp_rank=rank, sp_rank=0, device=torch.device("cpu"))
        experts = ExpertParallel(mesh, ep, model)
    for n, p in model.named_parameters():
        p.grad = grads[n][experts_rows(n, rank, ep)] if ep > 1 and n in experts.names else grads[n]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt.step()
    return model, opt, experts


def experts_rows(name: str, rank: int, ep: int) -> slice:
    n = CFG["moe_experts"] // ep
    e = rank % ep
    return slice(e * n, (e + 1) * n)


def state(model, opt) -> dict:
    """Every parameter and AdamW moment by name."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, s in opt.state.items():
        out.update({f"{names[id(p)]}/{k}": s[k].clone() for k in MOMENTS})
    return out


def differences(got: dict, ref: dict, rank: int, ep: int, experts: set) -> list:
    """Names whose tensor is not bitwise the reference's (this rank's rows of it for an expert entry)."""
    rows = lambda n, t: t[experts_rows(n, rank, ep)] if n.split("/")[0] in experts else t  # noqa: E731
    return [n for n in ref if not torch.equal(got[n], rows(n, ref[n]))]


def load_fresh(path: str, rank=0, world=1, ep=1) -> tuple:
    """A model and optimizer of another seed (a step taken, so the moments exist), then the checkpoint loaded."""
    model, opt, experts = trained(rank, world, ep, seed=7)
    before = state(model, opt)
    assert model_mismatch(path, model, experts) is None
    load_checkpoint(path, model, opt, experts=experts)
    return before, state(model, opt)


# ------------------------------------------------------------------------------------------ one rank, fake group
@pytest.fixture
def rank1_of_2():
    """This process as rank 1 of 2 on torch's fake process group (collectives return at once; no rank 0 exists)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")   # no_dist: intended
def test_a_rank_writes_its_experts_rows_and_reads_them_from_a_whole_checkpoint(tmp_path, rank1_of_2):
    """Rank 1 at ep = 2 (experts 4..7 of 8): its save plan holds each expert entry (weights, both moments) as the
    block of rows [4, 8) of the global [8, ...] tensor, and nothing whole (before: the gathered [8] tensors); a
    whole-expert checkpoint (ep = 1, the old format) gives it exactly the reference's rows 4..7 (DCP run for this
    rank alone: no_dist). Control: the model loaded into differed in every expert entry, and the rows of rank 0 are
    not what rank 1 holds after the load."""
    ref_model, ref_opt, _ = trained()
    whole = dict(zip(("model", "optim"), get_state_dict(ref_model, ref_opt)))
    dcp.save(whole, checkpoint_id=str(tmp_path / "whole"), no_dist=True)
    model, opt, experts = trained(1, 2, 2)
    names = set(experts.names)
    model_sd, optim_sd = get_state_dict(model, opt)
    experts.to_sharded(model_sd, optim_sd)
    planner = BalancedSavePlanner()
    planner.set_up_planner({"model": model_sd, "optim": optim_sd}, is_coordinator=False)
    blocks = {i.index.fqn: (int(i.tensor_data.chunk.offsets[0]), int(i.tensor_data.chunk.sizes[0]),
                            int(i.tensor_data.size[0]))
              for i in planner.create_local_plan().items
              if ".experts." in i.index.fqn and not i.index.fqn.endswith(".step")}   # AdamW step: a scalar
    assert len(blocks) == 3 * len(names) and set(blocks.values()) == {(4, 4, 8)}, blocks
    # the load, into a model of another seed: templates of this rank's rows, read from the one [8, ...] block
    model, opt, experts = trained(1, 2, 2, seed=7)
    before = state(model, opt)
    model_sd, optim_sd = get_state_dict(model, opt)
    experts.to_sharded(model_sd, optim_sd)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(tmp_path / "whole"), no_dist=True)
    experts.to_local(loaded["model"], loaded["optim"])
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    ref = state(ref_model, ref_opt)
    assert differences(state(model, opt), ref, 1, 2, names) == []
    assert {f"{n}/{k}" for n in names for k in MOMENTS} | names <= set(differences(before, ref, 1, 2, names))
    # control: rank 0's rows (0..3) are not what rank 1 reads
    assert differences(state(model, opt), ref, 0, 2, names) != []


# ------------------------------------------------------------------------------------------ gloo workers
def save_and_load_at_ep(rank: int, world: int, root: str, ep: int, load_from: list) -> dict:
    """Save this world's checkpoint (ep = world) to root/ep{ep}, then load each of `load_from` into a fresh model;
    per loaded path: (entries that differ from the reference, entries the fresh model already had right)."""
    model, opt, experts = trained(rank, world, ep)
    ref_local = state(model, opt)
    if save_checkpoint(os.path.join(root, f"ep{ep}"), 1, model, opt, {"step": 1}, "", experts=experts) is None:
        raise AssertionError("nothing saved")
    ref = state(*trained()[:2])   # the one-process reference, whole experts
    names = set(expert_parameter_names(model))
    out = {"own rows are the reference's": differences(ref_local, ref, rank, ep, names)}
    for path in load_from:
        before, got = load_fresh(path, rank, world, ep)
        out[path] = (differences(got, ref, rank, ep, names),
                     [n for n in ref if not differences({n: before[n]}, {n: ref[n]}, rank, ep, names)])
    return out


def step_path(root: str, ep: int) -> str:
    return os.path.join(root, f"ep{ep}", "step_00000001")


def expert_blocks(path: str) -> dict:
    """Per expert entry of the checkpoint: [(first row, rows, file that holds it, bytes)]."""
    meta = FileSystemReader(path).read_metadata()
    names = expert_parameter_names(HybridLM(HybridConfig(**CFG)))
    keys = [f"model.{n}" for n in names] + [f"optim.state.{n}.{k}" for n in names for k in MOMENTS]
    return {k: sorted((int(c.offsets[0]), int(c.sizes[0]), meta.storage_data[idx].relative_path,
                       meta.storage_data[idx].length)
                      for c in meta.state_dict_metadata[k].chunks
                      for idx in meta.storage_data if idx.fqn == k and list(idx.offset) == list(c.offsets))
            for k in keys}


@pytest.fixture(scope="module")
def ep2_and_ep1(tmp_path_factory):
    """root/ep1: saved in this process (whole experts, as every checkpoint before experts were sharded); root/ep2:
    saved by 2 gloo ranks at ep = 2, which also load both back."""
    root = str(tmp_path_factory.mktemp("moe_ckpt"))
    model, opt, _ = trained()
    save_checkpoint(os.path.join(root, "ep1"), 1, model, opt, {"step": 1}, "")
    results = spawn(save_and_load_at_ep, 2, root, 2, [step_path(root, 1), step_path(root, 2)])
    return root, results


@pytest.mark.slow   # the `ep2_and_ep1` fixture: 2 gloo ranks (~25 s on 2 shared cores)
def test_each_ep_rank_writes_only_its_experts(ep2_and_ep1):
    """Every expert entry (weights, both moments) is saved as 2 blocks of E/2 rows, block e in rank e's file: no
    rank wrote (or gathered) the whole tensor. Before this, each entry was one [E, ...] block of a gathered copy."""
    root, _ = ep2_and_ep1
    n = CFG["moe_experts"] // 2
    held = {r: 0 for r in range(2)}
    for key, blocks in expert_blocks(step_path(root, 2)).items():
        assert [(b[0], b[1], b[2]) for b in blocks] == [(0, n, "__0_0.distcp"), (n, n, "__1_0.distcp")], key
        for r, b in enumerate(blocks):
            held[r] += b[3]
    # control: the ep = 1 checkpoint holds each entry whole, in one block
    whole = expert_blocks(step_path(root, 1))
    assert all(len(b) == 1 and b[0][1] == 2 * n for b in whole.values())
    # a rank's file holds its experts' payload (weights and 2 moments, fp32) and less than the whole entries
    model = HybridLM(HybridConfig(**CFG))
    payload = sum(3 * 4 * p.numel() // 2 for name, p in model.named_parameters()
                  if name in set(expert_parameter_names(model)))
    whole_bytes = sum(b[0][3] for b in whole.values())
    assert payload <= held[0] < whole_bytes and payload <= held[1] < whole_bytes, (held, payload, whole_bytes)


@pytest.mark.slow   # the `ep2_and_ep1` fixture: 2 gloo ranks (~25 s on 2 shared cores)
def test_ep2_ranks_hold_the_reference_rows_and_load_at_ep2_and_from_ep1(ep2_and_ep1):
    """At ep = 2, each rank's experts are bitwise the reference's rows; the ep = 2 checkpoint loads back at ep = 2,
    and the whole-expert checkpoint (ep = 1, the old format) loads at ep = 2, every entry exact."""
    root, results = ep2_and_ep1
    for rank, out in enumerate(results):
        assert out["own rows are the reference's"] == [], rank
        for ep in (1, 2):
            wrong, already_right = out[step_path(root, ep)]
            assert wrong == [], (rank, ep, wrong)
            assert not any("experts" in n for n in already_right), already_right   # control: the load moved them


@pytest.mark.slow   # the `ep2_and_ep1` fixture: 2 gloo ranks (~25 s on 2 shared cores)
def test_ep2_checkpoint_loads_at_ep1_resume_and_eval(ep2_and_ep1):
    """The ep = 2 checkpoint in one process: the resume path (model + AdamW) and the `lsp eval` / `generate` /
    `export` path (weights only, no process group) give the reference's whole experts exactly."""
    root, _ = ep2_and_ep1
    ref = state(*trained()[:2])
    before, got = load_fresh(step_path(root, 2))
    assert [n for n in ref if not torch.equal(got[n], ref[n])] == []
    assert not torch.equal(before["layers.0.mlp.experts.gate"], ref["layers.0.mlp.experts.gate"])   # control
    torch.manual_seed(7)
    plain = HybridLM(HybridConfig(**CFG))
    load_model_state(step_path(root, 2), plain)
    assert all(torch.equal(p, ref[n]) for n, p in plain.named_parameters())


@pytest.mark.slow   # 4 more gloo processes (~30 s on 2 shared cores)
def test_ep2_checkpoint_loads_at_ep4(ep2_and_ep1):
    root, _ = ep2_and_ep1
    for rank, out in enumerate(spawn(save_and_load_at_ep, 4, root, 4, [step_path(root, 2)])):
        assert out["own rows are the reference's"] == [], rank
        wrong, already_right = out[step_path(root, 2)]
        assert wrong == [] and not any("experts" in n for n in already_right), (rank, wrong)


@pytest.mark.slow   # the `ep2_and_ep1` fixture: 2 gloo ranks (~25 s on 2 shared cores)
def test_ranks_write_about_equal_bytes(ep2_and_ep1):
    """The replicated (dense) entries are spread so that both ranks write about the same bytes
    (`checkpoint.balanced_writes`): 213 and 236 kB here, the rest is torch.save's framing of the many small entries,
    which the balance (by payload) does not see. Control, the same save with DCP's own dedup: 96 and 353 kB, rank 1
    wrote every dense tensor."""
    root, _ = ep2_and_ep1
    sizes = [os.path.getsize(os.path.join(step_path(root, 2), f"__{r}_0.distcp")) for r in range(2)]
    assert max(sizes) < 1.25 * min(sizes), sizes


def test_balanced_writes_places_each_item_once_on_the_least_loaded_holder():
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    from lsp.train.checkpoint import balanced_writes

    def item(name, numel):
        chunk = ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([numel]))
        data = TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=torch.float32),
                               size=torch.Size([numel]))
        return WriteItem(index=MetadataIndex(name, [0]), type=WriteItemType.TENSOR, tensor_data=data)

    dense = [item(f"dense{i}", n) for i, n in enumerate([50, 40, 30, 20, 10])]
    plans = [SavePlan([item("own0", 100), *dense]), SavePlan([*dense, item("own1", 100)])]
    out = balanced_writes(plans)
    names = [sorted(i.index.fqn for i in p.items) for p in out]
    assert sorted(names[0] + names[1]) == sorted(["own0", "own1"] + [d.index.fqn for d in dense])   # each once
    assert "own0" in names[0] and "own1" in names[1]
    loads = [sum(i.tensor_storage_size() for i in p.items) for p in out]
    assert abs(loads[0] - loads[1]) <= 10 * 4, loads   # 400 + 600 / 2 bytes each, up to the smallest item
