"""The dp x sp mesh: one named torch DeviceMesh(("dp", "sp")) over all ranks.

Global rank = dp_rank * sp + sp_rank: the ranks of one sequence-parallel group are consecutive, so with
`--nproc-per-node` a multiple of sp, SP traffic (every layer) stays inside a node and only the gradient all-reduce
(once per step) crosses nodes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from lsp.run_config import Config, ConfigError, check_world


@dataclass
class Mesh:
    rank: int
    world: int
    dp: int
    sp: int
    dp_rank: int
    sp_rank: int
    device: torch.device
    device_mesh: Optional[object] = None  # DeviceMesh (dp, sp) named ("dp", "sp"); None in one process
    sp_group: Optional[object] = None     # ProcessGroup of this rank's SP group: device_mesh.get_group("sp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda requested but no CUDA device is available")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def check_device(cfg: Config, world: int) -> torch.device:
    """The device of this config, after the checks that need torch (also run by `lsp launch` before the ranks)."""
    device = resolve_device(cfg)
    resolve_backend(cfg, device)
    return device


def resolve_backend(cfg: Config, device: torch.device) -> str:
    backend = cfg.parallel.backend
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend", "nccl needs CUDA devices; use gloo (or auto) on CPU")
    return backend


def init_mesh(cfg: Config) -> Mesh:
    """Start torch.distributed when launched by torchrun (WORLD_SIZE set) and build the SP groups."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    check_world(cfg, world)   # the rest was validated once, when this process loaded the config
    sp = cfg.parallel.sp
    dp = world // sp
    device = check_device(cfg, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = resolve_backend(cfg, device)   # checked in one process too: the same config must not fail later
    mesh = Mesh(rank=rank, world=world, dp=dp, sp=sp, dp_rank=rank // sp, sp_rank=rank % sp, device=device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=10),
                                device_id=device if device.type == "cuda" else None, **_restart_store(rank, world))
    if world > 1:   # row-major: global rank = dp_rank * sp + sp_rank, as in the module docstring
        from torch.distributed.device_mesh import init_device_mesh

        mesh.device_mesh = init_device_mesh(device.type, (dp, sp), mesh_dim_names=("dp", "sp"))
        mesh.sp_group = mesh.device_mesh.get_group("sp") if sp > 1 else None
    return mesh


def _restart_store(rank: int, world: int) -> dict:
    """After a torchrun restart (--max-restarts), a fresh key prefix in the agent's store.

    The store outlives the workers and still holds the dead attempt's gloo addresses; without a prefix the new ranks
    read them and fail with "connectFullMesh ... Connection refused" (seen with torch 2.13, gloo)."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0:
        return {}
    from torch.distributed.rendezvous import rendezvous
    store, _, _ = next(rendezvous("env://", rank, world))
    return {"store": dist.PrefixStore(f"lsp_attempt_{attempt}", store), "rank": rank, "world_size": world}


def all_reduce_mean(values: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Mean over all ranks (a float tensor on the mesh device); identity on a single process."""
    if mesh.world > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= mesh.world
    return values


def all_reduce_sum(values: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    if mesh.world > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def barrier(mesh: Mesh) -> None:
    if mesh.world > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
