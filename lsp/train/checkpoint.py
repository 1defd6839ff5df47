"""Atomic, resharding checkpoints with torch.distributed.checkpoint (DCP).

Layout of `<dir>`:
    step_00000100/            complete checkpoint: DCP shards of {"model", "optim"} (.metadata + *.distcp),
        trainer.pt            step, scheduler, data position (rank 0)
        rng_<rank>.pt         per-rank RNG states
        config.yaml           the resolved run config (what `lsp eval` rebuilds the model from)
        manifest.json         size and SHA-256 of every file above (lsp/train/manifest.py), checked before reading
    step_00000200.tmp/        being written; never read
    latest                    one line, the name of the newest complete checkpoint

Atomicity: everything is written into `step_N.tmp`, all ranks meet at a barrier, rank 0 renames the folder to
`step_N` (atomic on POSIX) and only then replaces `latest` (tmp file + os.replace). A crash at any moment leaves the
previous complete checkpoint and `latest` intact; an existing complete checkpoint is never overwritten. A checkpoint
damaged later (a truncated or corrupted file) fails its manifest: a resume falls back to the newest intact one
(lsp/train/runs.py:set_aside_damaged), `lsp eval` / `generate` / `export` name it in one line.
DCP stores parameters by fully-qualified name with their global shapes, so a checkpoint saved at one dp/sp size (or
FSDP sharding) loads at another; under expert parallelism each rank writes only its experts' rows (blocks of the
whole expert tensors), which load at any ep size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import warnings
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .files import write_text_atomic
from .manifest import write_manifest
from .runs import STEP_DIR, find_checkpoint, is_complete, latest_checkpoint, step_dir  # noqa: F401 (torch-free)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns when used without a process group; a single-process run is intended, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _item_bytes(item) -> int:
    return item.tensor_storage_size() or 1   # a non-tensor entry: size unknown, as DCP's own dedup counts it


def balanced_writes(plans: list) -> list:
    """Each write item once (plans: one SavePlan per rank), so that the ranks write about equal bytes: the items
    only one rank holds (its experts' rows) count first, then each replicated item, largest first, goes to the
    least-loaded rank holding it. DCP's own dedup walks the items in rank order and gives each replicated one to
    the rank least loaded so far, before it has counted the later ranks' own items: under expert parallelism the
    later ranks wrote the dense tensors (tiny-moe-cpu at ep = 2: rank 1 wrote 2.4 times the bytes of rank 0)."""
    holders: Dict[Any, list] = {}
    items = {}
    for rank, plan in enumerate(plans):
        for item in plan.items:
            holders.setdefault(item.index, []).append(rank)
            items[item.index] = item
    load = [0] * len(plans)
    owner = {index: ranks[0] for index, ranks in holders.items() if len(ranks) == 1}
    for index, rank in owner.items():
        load[rank] += _item_bytes(items[index])
    replicated = sorted((index for index, ranks in holders.items() if len(ranks) > 1),
                        key=lambda index: -_item_bytes(items[index]))
    for index in replicated:
        owner[index] = min(holders[index], key=lambda rank: load[rank])
        load[owner[index]] += _item_bytes(items[index])
    return [dataclasses.replace(plan, items=[item for item in plan.items if owner[item.index] == rank])
            for rank, plan in enumerate(plans)]


class BalancedSavePlanner(DefaultSavePlanner):
    """DCP's default planner with `balanced_writes` in place of its dedup step."""

    def _dedup_save_plans(self, all_plans: list) -> list:
        return balanced_writes(all_plans)


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: str, step: int, model, optimizer, trainer_state: Dict[str, Any], config_yaml: str,
                    keep: int = 2, deepspeed_engine=None, experts=None) -> Optional[str]:
    """Collective: every rank calls it. Returns the final path (None if that step was already saved).
    experts: the run's `ExpertParallel` (parallel.ep > 1): each rank writes only its own experts' rows (weights
    and AdamW moments) as blocks of the whole [E, ...] tensors (lsp/train/expert_parallel.py)."""
    final = step_dir(root, step)
    tmp = final + ".tmp"
    exists = os.path.isdir(final)
    if exists:  # a complete checkpoint is never overwritten (same on every rank: shared file system)
        return None
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)   # leftovers of a crashed save
        os.makedirs(tmp)
    _barrier()
    if deepspeed_engine is not None:
        deepspeed_engine.save_checkpoint(tmp, tag="deepspeed")
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        if experts is not None:
            experts.to_sharded(model_sd, optim_sd)
        with _quiet_single_process():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, planner=BalancedSavePlanner())
    torch.save(rng_state(), os.path.join(tmp, f"rng_{_rank()}.pt"))
    _write_trainer_state(tmp, trainer_state, config_yaml)
    _barrier()
    if _rank() == 0:
        write_manifest(tmp)   # every rank's files are in: their sizes and checksums, before the folder is published
        _publish(tmp, final)
        write_text_atomic(os.path.join(root, "latest"), os.path.basename(final) + "\n", sync=True)
        _prune(root, keep)
    _barrier()
    return final


def _write_trainer_state(tmp: str, trainer_state: Dict[str, Any], config_yaml: str) -> None:
    """Rank 0 writes trainer.pt (whose presence makes the folder complete: runs.is_complete) and config.yaml.
    Every rank calls it after its shards, so a kill before it leaves a torn step_N.tmp (the SIGKILL test pauses
    here: tests/reliability/faulty_entry.py)."""
    if _rank() == 0:
        torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(config_yaml)


def _publish(tmp: str, final: str) -> None:
    os.rename(tmp, final)   # atomic: readers see either no step_N or a complete one


def _prune(root: str, keep: int) -> None:
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root)
                   if (m := STEP_DIR.match(name)) and is_complete(os.path.join(root, name)))
    for _, name in steps[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def model_mismatch(path: str, model, experts=None) -> Optional[str]:
    """None when the DCP checkpoint at path holds exactly this model's parameters (names and global shapes), else
    the first difference, e.g. "model.embed.weight is [81, 64] there, [81, 32] here" (read from .metadata only)."""
    saved = {k: list(v.size) for k, v in dcp.FileSystemReader(path).read_metadata().state_dict_metadata.items()
             if k.startswith("model.") and hasattr(v, "size")}
    here_sd = get_state_dict(model, [])[0]
    here = {f"model.{k}": experts.global_shape(k, v.shape) if experts is not None else list(v.shape)
            for k, v in here_sd.items()}
    for name in sorted(saved.keys() | here.keys()):
        if saved.get(name) != here.get(name):
            return (f"{name} is {saved.get(name, 'absent')} there, {here.get(name, 'absent')} here").replace("'", "")
    return None


def deepspeed_model_state(path: str) -> Dict[str, torch.Tensor]:
    """The full fp32 weights of a DeepSpeed checkpoint (`<path>/deepspeed/`, saved at any world size), read in one
    process. ZeRO 0 keeps whole weights in the model-states file; ZeRO 1-3 partitions are merged by DeepSpeed's
    own zero_to_fp32 (then deepspeed must be installed)."""
    folder = os.path.join(path, "deepspeed")
    if not any("zero_pp_rank" in name and name.endswith("optim_states.pt") for name in os.listdir(folder)):
        states = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu",
                            weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise ValueError(f"{path} is a DeepSpeed ZeRO checkpoint; merging its partitions needs deepspeed "
                         "(pip install 'lsp-hybrid[deepspeed]')") from None
    return get_fp32_state_dict_from_zero_checkpoint(path, tag="deepspeed")


def load_model_state(path: str, model) -> None:
    """Load only the weights of any checkpoint kind (DCP from DDP / FSDP at any dp x sp, or DeepSpeed) into a plain
    model in place; works in one process without a process group."""
    if not os.path.isfile(os.path.join(path, ".metadata")) and os.path.isdir(os.path.join(path, "deepspeed")):
        model.load_state_dict(deepspeed_model_state(path))
        return
    model_sd = get_state_dict(model, [])[0]
    with _quiet_single_process():
        dcp.load({"model": model_sd}, checkpoint_id=path)
    set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={})


def load_checkpoint(path: str, model, optimizer=None, deepspeed_engine=None, experts=None) -> Dict[str, Any]:
    """Collective: load model (+ optimizer) in place; returns the trainer state saved by rank 0. experts: as in
    `save_checkpoint` (this rank reads its rows of the saved blocks: a checkpoint saved at any ep size loads)."""
    if deepspeed_engine is not None:
        deepspeed_engine.load_checkpoint(path, tag="deepspeed")
    elif optimizer is None:
        load_model_state(path, model)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        if experts is not None:
            experts.to_sharded(model_sd, optim_sd)
        state = {"model": model_sd, "optim": optim_sd}
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path)
        if experts is not None:
            experts.to_local(state["model"], state["optim"])
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = os.path.join(path, f"rng_{_rank()}.pt")
    if os.path.isfile(rng_file):   # absent when resuming at a larger world size: keep the seeded state
        set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
