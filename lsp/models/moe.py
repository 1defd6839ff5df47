"""`MoE`: the mixture-of-experts feed-forward of a block (routed SwiGLU experts + optional shared experts).

The math (routers, capacity, losses) is in `lsp.ops.moe`; expert parallelism (experts split over ranks, tokens moved
by all-to-all) in `lsp.parallel.ep`. Here: the parameters, one forward that is the same with and without EP, and the
model-level helpers (`use_expert_parallel`, `update_expert_bias`).

Balancing, per layer (docs/moe.md): the auxiliary loss and the z-loss are returned with the output and added to the
training loss by `HybridLM`; the aux-loss-free bias b (`expert_bias`, a buffer) moves outside autograd after each
optimizer step: b_e += rate · sign(mean load - load_e) over the assignments since the last update (DeepSeek-V3).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lsp.ops.moe import assign, aux_loss_terms, balancing_losses, capacity, expert_counts, expert_ffn, route
from lsp.parallel.collectives import replaying
from lsp.parallel.ep import EPContext, run_experts

from .config import HybridConfig
from .layers import SwiGLU


class Experts(nn.Module):
    """The routed experts' SwiGLU weights, stacked: gate, up [E, D, I], down [E, I, D] (E_local under real EP)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.up = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.down = nn.Parameter(torch.empty(num_experts, intermediate, hidden))

    def reset_parameters(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.gate, 0.0, std)
        nn.init.normal_(self.up, 0.0, std)
        nn.init.normal_(self.down, 0.0, residual_std)

    def forward(self, x: torch.Tensor, counts: list[int], rows: slice = slice(None)) -> torch.Tensor:
        # x: [M, D] grouped by expert (counts[e] rows for the e-th expert of `rows`) -> [M, D]; the weights in x's
        # dtype, as autocast would cast them, and as FSDP2's bf16 policy does not (the experts stay outside it)
        return expert_ffn(x, counts, *(w[rows].to(x.dtype) for w in (self.gate, self.up, self.down)))


class MoE(nn.Module):
    """y = Σ_i w_i FFN_{e_i}(x) (+ shared experts), see `lsp.ops.moe`; forward returns (y, balancing loss)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        E, D, I = cfg.moe_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.router = nn.Linear(D, E, bias=False)
        self.experts = Experts(E, D, I)
        self.shared = SwiGLU(D, I * cfg.moe_shared_experts) if cfg.moe_shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(E))           # aux-loss-free selection bias (checkpointed)
        self.register_buffer("load", torch.zeros(E), persistent=False)  # assignments since the last bias update
        self.dropped = 0                                               # dropped assignments since then
        self.ep: EPContext | None = None                               # set by `use_expert_parallel`
        self.stats: dict = {}                                          # of the last forward, for logging

    def reset_buffers(self) -> None:
        """The unsaved counts since the last bias update back to zero (a model loaded on the meta device)."""
        self.load.zero_()
        self.dropped = 0

    def forward(self, x: torch.Tensor, sp=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x: [B, T, D] (the local shard under SP) -> y [B, T, D], balancing loss [] (None when both coefs are 0)
        B, T, D = x.shape
        h = x.reshape(B * T, D)
        dtype = torch.promote_types(x.dtype, torch.float32)            # routing in fp32 at least, autocast or not
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(h.to(dtype), self.router.weight.to(dtype))   # [N, E]
        routing = route(logits, self.cfg.moe_router, self.cfg.moe_top_k, self.expert_bias)
        y = self._routed(h, routing)
        if self.shared is not None:
            y = y + self.shared(h)
        self._count(routing.experts)
        return y.view(B, T, D), self._balancing(routing, logits, sp)

    def _routed(self, h: torch.Tensor, routing) -> torch.Tensor:
        """Σ_i w_i FFN_{e_i}(h) per token, by dispatch groups (the tokens of one EP rank; all tokens without EP)."""
        E, k = self.cfg.moe_experts, self.cfg.moe_top_k
        R = 1 if self.ep is None else len(self.ep.ranks)
        N = h.shape[0] // R
        assert N * R == h.shape[0], f"{h.shape[0]} tokens do not split over {R} emulated EP ranks"
        slots = capacity(N, k, E, self.cfg.moe_capacity_factor)
        plans = [assign(routing.experts[r * N:(r + 1) * N], E, slots) for r in range(R)]
        device = h.device.type   # under autocast the experts compute in its dtype: dispatch the rows in it
        rows = h.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else h
        xs = [rows[r * N:(r + 1) * N][p.token] for r, p in enumerate(plans)]
        if self.ep is None:
            outs = [self.experts(xs[0], plans[0].counts.tolist())]
        else:
            outs = run_experts(xs, [p.counts for p in plans], self.ep,
                               lambda x, counts, rank: self.experts(x, counts, self.ep.expert_rows(rank, E)))
        self.stats["dropped"] = sum(p.dropped for p in plans)
        if self.training and not replaying():
            self.dropped += self.stats["dropped"]
        return torch.cat([self._combine(h[:N], p, routing.weights[r * N:(r + 1) * N], out)
                          for r, (p, out) in enumerate(zip(plans, outs))])

    @staticmethod
    def _combine(like: torch.Tensor, plan, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # out: [M, D] expert outputs of the kept assignments -> [N, D] their weighted sum per token, in like's
        # dtype (under autocast the experts' outputs are bf16, the residual stream is not)
        w = plan.weights(weights).to(like.dtype)
        return torch.zeros_like(like).index_add(0, plan.token, out.to(like.dtype) * w[:, None])

    def _count(self, experts: torch.Tensor) -> None:
        """Record the expert load: of this forward (logging) and, in training, since the last bias update (not again
        in an activation-checkpoint recompute, which routes the same tokens a second time)."""
        load = expert_counts(experts, self.cfg.moe_experts).to(self.load.dtype)
        self.stats["load"] = load
        if self.training and not replaying():
            self.load += load

    def _balancing(self, routing, logits: torch.Tensor, sp) -> torch.Tensor | None:
        c = self.cfg
        if not (c.moe_aux_loss_coef or c.moe_z_loss_coef):
            return None
        terms = aux_loss_terms(routing.scores, routing.experts, logits)
        if sp is not None:   # global counts and sums over the sequence; identity backward (each rank's share)
            terms = sp.all_reduce_sum(terms)
        loss = balancing_losses(terms, c.moe_top_k, c.moe_aux_loss_coef, c.moe_z_loss_coef)
        self.stats["aux_loss"] = loss.detach()   # read at logging (`update_expert_bias`): no host sync here
        return loss


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the routed experts' parameters (split over EP ranks; reduced over their own replicas only)."""
    return [f"{name}.experts.{p}" for name, _ in moe_layers(model) for p in ("gate", "up", "down")]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active) parameters of the whole model, whatever share of the experts this rank holds: each MoE
    block's experts count E times one expert's weights (a rank keeps E / ep of them under expert parallelism), and
    a token uses top_k of the E (active). Without MoE both are `num_parameters(model)`."""
    from .flops import num_parameters

    total = active = num_parameters(model)
    for _, m in moe_layers(model):
        one = sum(w[0].numel() for w in (m.experts.gate, m.experts.up, m.experts.down))
        held = m.experts.gate.shape[0]
        total += (m.cfg.moe_experts - held) * one
        active += (m.cfg.moe_top_k - held) * one
    return total, active


def use_expert_parallel(model: nn.Module, ep: EPContext) -> nn.Module:
    """Run every MoE layer of `model` expert-parallel over `ep`. With real ranks each layer keeps only this rank's
    experts (rows `ep.expert_range(E)` of the full weights, so an ep > 1 model starts from the ep = 1 one)."""
    for _, moe in moe_layers(model):
        moe.ep = ep
        if not ep.emulated:
            rows = ep.expert_range(moe.cfg.moe_experts)
            for name in ("gate", "up", "down"):
                full = getattr(moe.experts, name)
                setattr(moe.experts, name, nn.Parameter(full.detach()[rows.start:rows.stop].clone(),
                                                        requires_grad=full.requires_grad))
    return model


@torch.no_grad()
def update_expert_bias(model: nn.Module, all_reduce_sum=None) -> dict:
    """After an optimizer step: the aux-loss-free balancing step b_e += rate · sign(mean load - load_e) (when
    moe_bias_update_rate > 0), with the load since the last call summed over all ranks by `all_reduce_sum` (every
    rank then moves its replica of b alike); resets the counts. Returns the step's metrics per MoE layer: the global
    expert load max / mean (1 = balanced) and dropped assignments, and this rank's last balancing loss."""
    layers = moe_layers(model)
    if not layers:
        return {}
    counts = torch.stack([torch.cat([m.load, m.load.new_tensor([m.dropped])]) for _, m in layers])
    if all_reduce_sum is not None:
        counts = all_reduce_sum(counts)
    metrics = {}
    for (name, m), row in zip(layers, counts):
        load, layer = row[:-1], name.removeprefix("layers.").split(".")[0]
        if m.cfg.moe_bias_update_rate:
            m.expert_bias += m.cfg.moe_bias_update_rate * torch.sign(load.mean() - load).to(m.expert_bias.dtype)
        if load.sum() > 0:
            metrics[f"moe/{layer}/load_max_over_mean"] = float(load.max() / load.mean())
            metrics[f"moe/{layer}/dropped"] = int(row[-1])
        if "aux_loss" in m.stats:
            metrics[f"moe/{layer}/aux_loss"] = float(m.stats["aux_loss"])
        m.load.zero_()
        m.dropped = 0
    return metrics

