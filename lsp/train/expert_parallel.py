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

Checkpoints hold whole expert weights (gathered over the EP group before the save, sliced after the load), exactly
what an ep = 1 run saves: a checkpoint loads at any ep size, and its optimizer state too.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

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
        sharded_sq = _sum_sq(g.to_local() for g in dense if hasattr(g, "to_local"))
        if any(hasattr(g, "to_local") for g in dense):
            dist.all_reduce(sharded_sq)
        norm = (_sum_sq(g for g in dense if not hasattr(g, "to_local")) + sharded_sq + expert_sq).sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.item() if hasattr(g, "to_local") else coef.to(g.dtype))
        return norm

    # ------------------------------------------------------------------------------------------ checkpoints
    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.ep)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts)

    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        n = full.shape[0] // self.ep
        e = dist.get_rank(self.group)
        return full[e * n:(e + 1) * n]

    def _map(self, model_sd: dict, optim_sd: dict, fn) -> None:
        for name in list(model_sd):
            if self.is_expert(name):
                model_sd[name] = fn(model_sd[name])
        states = optim_sd.get("state", {})
        for name, state in states.items():   # new dicts: get_state_dict's may be the optimizer's own
            if self.is_expert(name):
                states[name] = {k: fn(v) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in state.items()}

    def to_full(self, model_sd: dict, optim_sd: dict) -> None:
        """In place: expert entries (weights, Adam moments) gathered to the whole [E, ...] tensors."""
        self._map(model_sd, optim_sd, self._gather)

    def full_templates(self, model_sd: dict, optim_sd: dict) -> None:
        """In place: expert entries replaced by empty whole-size tensors for DCP to load into."""
        self._map(model_sd, optim_sd, lambda t: t.new_empty(t.shape[0] * self.ep, *t.shape[1:]))

    def to_local(self, model_sd: dict, optim_sd: dict) -> None:
        """In place: whole expert entries cut to this rank's rows."""
        self._map(model_sd, optim_sd, lambda t: self._rows(t).clone())
