"""Mixture-of-experts math on one device: routers, capacity, the sort that groups tokens by expert, the experts.

For a token x (one row of [N, D]) with router logits z = W_r x over E experts:

    scores   s = softmax(z)  (router "softmax": Mixtral, Qwen-MoE)   or   s = sigmoid(z)  ("sigmoid": DeepSeek-V3)
    chosen   e_1..e_k = top-k of (s + b)       b: per-expert selection bias (aux-loss-free balancing), no gradient
    weights  w_i = s_{e_i} / Σ_j s_{e_j}       (normalised over the k chosen experts)
    output   y = Σ_i w_i · FFN_{e_i}(x)       FFN_e(x) = down_e(silu(gate_e x) ⊙ up_e x)

Losses (N tokens; under SP N, the counts and the score sums are global):

    aux    = E · Σ_e f_e · P_e,  f_e = (assignments to e) / (N k),  P_e = mean over tokens of s_e / Σ_e' s_e'
    z-loss = mean over tokens of logsumexp(z)²

Capacity (optional): expert e accepts at most C = ceil(cf · N_g · k / E) of the N_g tokens of a dispatch group (the
tokens one rank holds); assignments are served first-choices-first (all top-1 picks before any top-2), then in token
order, and the rest are dropped (they add nothing; counted). Dropless when cf is None.

On fake tensors (`lsp plan --measure`) the routing has no values, so the counts that size the dispatch cannot be
read: there every expert is taken to get an equal share of the assignments (`uniform_counts`), the planner's
assumption, so the measured step moves and computes what the model counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from lsp.names import MOE_ROUTERS


def _softmax_scores(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1)


def _sigmoid_scores(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits)


ROUTERS = {"softmax": _softmax_scores, "sigmoid": _sigmoid_scores}   # model.moe_router -> scores of the logits
assert tuple(ROUTERS) == MOE_ROUTERS, "lsp.names.MOE_ROUTERS and the router registry disagree"


def router_scores(name: str, logits: torch.Tensor) -> torch.Tensor:
    """Scores s [N, E] of router `name` (a registry lookup; an unknown name raises)."""
    if name not in ROUTERS:
        raise ValueError(f"moe_router: {name!r} is not one of {', '.join(ROUTERS)}")
    return ROUTERS[name](logits)


@dataclass
class Routing:
    weights: torch.Tensor   # [N, k] normalised weights of the chosen experts (differentiable)
    experts: torch.Tensor   # [N, k] long, chosen expert ids
    scores: torch.Tensor    # [N, E] router scores s (differentiable)


def route(logits: torch.Tensor, router: str, top_k: int, bias: torch.Tensor | None = None) -> Routing:
    """Choose top_k experts per token. logits: [N, E]; bias: [E] selection bias (changes which experts are
    chosen, never the weights)."""
    scores = router_scores(router, logits)
    select = scores.detach() if bias is None else scores.detach() + bias.to(scores.dtype)
    experts = select.topk(top_k, dim=-1).indices                       # [N, k]
    chosen = scores.gather(-1, experts)
    return Routing(weights=chosen / chosen.sum(-1, keepdim=True), experts=experts, scores=scores)


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """Slots per expert for a dispatch group of num_tokens tokens; None = dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


@dataclass
class Assignment:
    """The kept (token, slot) assignments of one dispatch group, sorted by expert (stable: first choices first,
    then token order). `order` indexes the slot-major flattening (i = slot * N + token)."""
    order: torch.Tensor     # [M] long
    counts: torch.Tensor    # [E] long, kept assignments per expert (sum M)
    dropped: int            # assignments over capacity
    num_tokens: int

    @property
    def token(self) -> torch.Tensor:
        return self.order % self.num_tokens

    def weights(self, weights: torch.Tensor) -> torch.Tensor:
        # weights: [N, k] -> [M] the weight of each kept assignment
        return weights.t().reshape(-1)[self.order]


def uniform_counts(assignments: int, num_experts: int) -> torch.Tensor:
    """[E] long on the host, real even under FakeTensorMode: `assignments` spread evenly over the experts (the
    first ones take the remainder). What fake-tensor routing is taken to give (module docstring)."""
    with unset_fake_temporarily():
        return torch.full((num_experts,), assignments // num_experts) + (
            torch.arange(num_experts) < assignments % num_experts)


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert [E] of experts [N, k], on experts' device (uniform on fake tensors)."""
    if is_fake(experts):
        return experts.new_tensor(uniform_counts(experts.numel(), num_experts).tolist())
    return torch.bincount(experts.reshape(-1), minlength=num_experts)


def assign(experts: torch.Tensor, num_experts: int, slots: int | None) -> Assignment:
    """Sort the assignments of experts [N, k] by expert and drop those beyond `slots` per expert."""
    N = experts.shape[0]
    if is_fake(experts):   # real uniform counts (they size the dispatch); the order only needs its length
        with unset_fake_temporarily():
            counts = uniform_counts(experts.numel(), num_experts)
            kept = counts if slots is None else counts.clamp(max=slots)
            M, dropped = int(kept.sum()), int((counts - kept).sum())
        return Assignment(order=torch.arange(M, device=experts.device), counts=kept, dropped=dropped, num_tokens=N)
    flat = experts.t().reshape(-1)                                     # slot-major: all first choices first
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    if slots is None:
        return Assignment(order=order, counts=counts, dropped=0, num_tokens=N)
    starts = counts.cumsum(0) - counts
    position = torch.arange(order.numel(), device=order.device) - starts[flat[order]]
    kept = counts.clamp(max=slots)
    return Assignment(order=order[position < slots], counts=kept, dropped=int((counts - kept).sum()), num_tokens=N)


def grouped_mm_available(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs (forward and backward) on CUDA for bf16; on CPU its backward fails in torch 2.13."""
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def expert_ffn(x: torch.Tensor, counts: list[int], gate: torch.Tensor, up: torch.Tensor,
               down: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over tokens grouped by expert: rows [sum counts[:e], sum counts[:e+1]) go to expert e.

    x: [M, D]; gate, up: [E, D, I]; down: [E, I, D] -> [M, D]. One grouped GEMM per projection where the device
    has one (`grouped_mm_available`), else a loop over the experts.
    """
    if grouped_mm_available(x) and all(t.stride(-1) == 1 for t in (gate, up, down)):
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(x, gate, offs=offs)) * torch._grouped_mm(x, up, offs=offs)
        return torch._grouped_mm(h, down, offs=offs)
    outs = [(F.silu(xe @ gate[e]) * (xe @ up[e])) @ down[e] for e, xe in enumerate(x.split(counts))]
    return torch.cat(outs) if outs else x[:0]


def aux_loss_terms(scores: torch.Tensor, experts: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The sums the balancing losses need, in one vector so that SP sums them in one all-reduce.

    scores, logits: [N, E]; experts: [N, k] -> [2E + 2]: assignments per expert (no gradient), Σ over tokens of the
    normalised scores per expert, Σ_t logsumexp(z_t)² and N.
    """
    E = scores.shape[-1]
    counts = expert_counts(experts, E).to(scores.dtype)
    probs = (scores / scores.sum(-1, keepdim=True)).sum(0)
    z = logits.logsumexp(-1).pow(2).sum()
    return torch.cat([counts, probs, z.view(1), z.new_tensor([float(scores.shape[0])])])


def balancing_losses(terms: torch.Tensor, top_k: int, aux_coef: float, z_coef: float) -> torch.Tensor:
    """aux_coef · aux + z_coef · z-loss from the (global) sums of `aux_loss_terms` ([2E + 2]) -> []."""
    E = (terms.shape[0] - 2) // 2
    counts, prob_sums, z_sum, n = terms[:E], terms[E:2 * E], terms[-2], terms[-1]
    aux = E * (counts / (n * top_k) * (prob_sums / n)).sum()
    return aux_coef * aux + z_coef * z_sum / n
