"""Expert parallelism in training (`parallel.ep`): the EP groups of the dp × sp mesh, the reduction of expert
gradients, the global gradient norm, and checkpoints of sharded experts.

Groups: the world's ranks (global rank = dp_rank · sp + sp_rank) are cut into world / ep EP groups of ep consecutive
ranks (with ep = sp, an EP group is an SP group); EP rank e of every group holds experts [e·E/ep, (e+1)·E/ep) of each
MoE layer, and those world / ep ranks are that shard's replicas.

Gradients: dense parameters keep the engine's reduction (the mean over all ranks of the loss scaled by sp, i.e.
Σ_sp / dp). An expert's gradient on its rank already sums the contributions of every token of its EP group (the
backward all-to-all brings them), so the sum over its replicas covers every token once; dividing by the world size
gives the same Σ_sp / dp scale. Expert parameters are therefore left out of DDP and reduced here, over their
replicas only.

Checkpoints: each rank saves only its own experts. Its expert weights and AdamW moments enter DCP as DTensors over the
(ep_replica, ep) mesh of the world's ranks with placements (Replicate, Shard(0)): the rows [e·E/ep, (e+1)·E/ep) of
the global [E, ...] tensor. DCP records the global shape and each block's offset, writes every block once (one of
its replicas) and reads on load whatever blocks overlap the rows a rank holds, so a checkpoint saved at one ep size
loads at another, and one that holds whole experts (ep = 1, or saved by lsp before experts were sharded) loads too.
Nothing is gathered: no rank holds more than its own experts during a save or a load.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .dist import Mesh


def _strip(name: str) -> str:
    return name.removeprefix("module.")


def _sum_sq(grads) -> torch.Tensor:
    return sum((g.double().pow(2).sum() for g in grads), torch.zeros((), dtype=torch.float64))


class ExpertParallel:
    """This rank's EP group and replica group, and the expert parameters the engine must not reduce itself."""

    def __init__(self, mesh: Mesh, ep: int, model: nn.Module):
        from lsp.models.moe import expert_parameter_names, use_expert_parallel
        from lsp.parallel.ep import EPContext

        self.ep, self.world = ep, mesh.world
        groups = [dist.new_group(list(range(g * ep, (g + 1) * ep))) for g in range(mesh.world // ep)]
        replicas = [dist.new_group(list(range(e, mesh.world, ep))) for e in range(ep)]   # every rank creates all
        self.group, self.replica_group = groups[mesh.rank // ep], replicas[mesh.rank % ep]
        # the same groups as a 2-D mesh (row g: EP group g), what DTensor places the checkpointed shards on
        self.device_mesh = DeviceMesh.from_group([self.replica_group, self.group], mesh.device.type,
                                                 mesh=torch.arange(mesh.world).view(mesh.world // ep, ep),
                                                 mesh_dim_names=("ep_replica", "ep"))
        use_expert_parallel(model, EPContext(group=self.group))
        self.names = expert_parameter_names(model)
        self._name_set = set(self.names)
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]

    def is_expert(self, name: str) -> bool:
        return _strip(name) in self._name_set

    def reduce_grads(self) -> None:
        """Σ over the replicas of each expert gradient, / world (see the module docstring)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.world > self.ep:
                dist.all_reduce(p.grad, group=self.replica_group)
            p.grad /= self.world

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        """The global gradient norm (dense parameters replicated, expert shards summed over the EP group), and
        every gradient scaled by min(1, max_norm / norm) as torch's clip_grad_norm_ does."""
        experts = {id(p) for p in self.params}
        grads = [p.grad for p in params if p.grad is not None]
        dense = [g for p, g in zip([p for p in params if p.grad is not None], grads) if id(p) not in experts]
        expert_sq = _sum_sq(p.grad for p in self.params)
        dist.all_reduce(expert_sq, group=self.group)
        # FSDP2's dense gradients are shards (DTensors) over the whole world: their squares sum over it
        sharded = [g for g in dense if hasattr(g, "to_local")]
        sharded_sq = _sum_sq(g.to_local() for g in sharded)
        if sharded:
            dist.all_reduce(sharded_sq)
        norm = (_sum_sq(g for g in dense if not hasattr(g, "to_local")) + sharded_sq + expert_sq).sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        coef_value = coef.item() if sharded else None   # a DTensor scales by a number: one host read per step
        for g in grads:
            g.mul_(coef_value if hasattr(g, "to_local") else coef.to(g.dtype))
        return norm

    # ------------------------------------------------------------------------------------------ checkpoints
    def _map(self, model_sd: dict, optim_sd: dict, fn) -> None:
        for name in list(model_sd):
            if self.is_expert(name):
                model_sd[name] = fn(model_sd[name])
        states = optim_sd.get("state", {})
        for name, state in states.items():   # new dicts: get_state_dict's may be the optimizer's own
            if self.is_expert(name):
                states[name] = {k: fn(v) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in state.items()}

    def _shard(self, local: torch.Tensor) -> DTensor:
        # local: [E / ep, ...] this rank's rows -> the global [E, ...] tensor it is a block of (no copy)
        return DTensor.from_local(local, self.device_mesh, [Replicate(), Shard(0)], run_check=False)

    def to_sharded(self, model_sd: dict, optim_sd: dict) -> None:
        """In place: expert entries (weights, AdamW moments) become this rank's block of the global [E, ...] tensor,
        for DCP to save (each block once) or to load into (the rows of whatever blocks were saved)."""
        self._map(model_sd, optim_sd, self._shard)

    def to_local(self, model_sd: dict, optim_sd: dict) -> None:
        """In place: the inverse of `to_sharded` (this rank's rows, as the model and the optimizer hold them)."""
        self._map(model_sd, optim_sd, lambda t: t.to_local())

    def global_shape(self, name: str, shape: torch.Size) -> list[int]:
        """The whole model's shape of the state-dict entry `name` whose shape on this rank is `shape`."""
        return [shape[0] * self.ep, *shape[1:]] if self.is_expert(name) else list(shape)
