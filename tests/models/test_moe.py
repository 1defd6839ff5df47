"""The MoE feed-forward against a plain per-token loop (fp64): outputs, gradients, capacity drops, balancing losses.

The reference below routes one token at a time with Python's `sorted` (not torch.topk), applies each chosen expert
with explicit matrix products and serves capacity slots with a counter per expert: nothing is shared with
`lsp.ops.moe` but the parameters. fp64 throughout, so agreement is to round-off (1e-12).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from lsp.models import HybridConfig, HybridLM
from lsp.models.moe import MoE, update_expert_bias

TOL = dict(rtol=1e-10, atol=1e-12)


def moe_cfg(**kw):
    base = dict(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, layer_pattern="LS", moe_experts=6,
                moe_top_k=2, moe_intermediate_size=12)
    return HybridConfig(**{**base, **kw})


def make_moe(**kw):
    torch.manual_seed(0)
    moe = MoE(moe_cfg(**kw)).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    moe.expert_bias.copy_(torch.randn(moe.cfg.moe_experts, dtype=torch.float64) * 0.2)
    return moe


def reference(moe, x, normalise=True):
    """Per-token loop: returns (y [N, D], aux loss [], dropped). x: [N, D] one dispatch group."""
    c = moe.cfg
    E, k = c.moe_experts, c.moe_top_k
    ex = moe.experts
    picks, scores = [], []
    for t in range(x.shape[0]):
        z = moe.router.weight @ x[t]
        s = torch.softmax(z, -1) if c.moe_router == "softmax" else torch.sigmoid(z)
        sel = (s + moe.expert_bias).tolist()
        chosen = sorted(range(E), key=lambda e: -sel[e])[:k]
        total = sum(s[e] for e in chosen) if normalise else 1.0
        picks.append([(e, s[e] / total) for e in chosen])
        scores.append((s, z))
    slots = math.ceil(c.moe_capacity_factor * x.shape[0] * k / E) if c.moe_capacity_factor else None
    used, dropped = [0] * E, 0
    ys = [torch.zeros_like(x[0]) for _ in range(x.shape[0])]
    for slot in range(k):                                   # first choices are served first
        for t in range(x.shape[0]):
            e, w = picks[t][slot]
            if slots is not None and used[e] >= slots:
                dropped += 1
                continue
            used[e] += 1
            ys[t] = ys[t] + w * ((F.silu(x[t] @ ex.gate[e]) * (x[t] @ ex.up[e])) @ ex.down[e])
    y = torch.stack(ys)
    if moe.shared is not None:
        sh = moe.shared
        y = y + sh.down_proj(F.silu(sh.gate_proj(x)) * sh.up_proj(x))
    N = x.shape[0]
    f = [sum(1 for p in picks for e, _ in p if e == j) / (N * k) for j in range(E)]
    P = [sum(s[j] / s.sum() for s, _ in scores) / N for j in range(E)]
    aux = E * sum(fj * pj for fj, pj in zip(f, P))
    zl = sum(torch.logsumexp(z, -1) ** 2 for _, z in scores) / N
    return y, c.moe_aux_loss_coef * aux + c.moe_z_loss_coef * zl, dropped


def module_out(moe, x):
    y, aux = moe(x[None])
    return y[0], aux


def run(moe, x, **ref_kw):
    """[(y, grads, x grad)] of the module, then of the reference, for the objective Σ y·probe + balancing loss."""
    probe = torch.randn_like(x)
    out = []
    for fn in (module_out, lambda m, xg: reference(m, xg, **ref_kw)[:2]):
        moe.zero_grad()
        xg = x.clone().requires_grad_()
        y, aux = fn(moe, xg)
        ((y * probe).sum() + (aux if aux is not None else 0)).backward()
        out.append((y.detach(), {n: p.grad.clone() for n, p in moe.named_parameters()}, xg.grad))
    return out


CASES = [dict(), dict(moe_router="sigmoid"), dict(moe_shared_experts=2), dict(moe_top_k=1),
         dict(moe_router="sigmoid", moe_top_k=3, moe_aux_loss_coef=0.1, moe_z_loss_coef=0.01),
         dict(moe_aux_loss_coef=0.3, moe_z_loss_coef=0.05, moe_shared_experts=1)]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_moe_matches_per_token_reference(kw):
    moe = make_moe(**kw)
    x = torch.randn(20, 16, dtype=torch.float64)
    (y, grads, gx), (ry, rgrads, rgx) = run(moe, x)
    torch.testing.assert_close(y, ry, **TOL)
    torch.testing.assert_close(gx, rgx, **TOL)
    for n, g in rgrads.items():
        torch.testing.assert_close(grads[n], g, **TOL, msg=lambda m: f"{n}: {m}")


def test_negative_control_unnormalised_weights_are_caught():
    # Mixtral-style renormalisation left out (or the wrong experts' weights used) must fail the comparison
    moe = make_moe()
    x = torch.randn(20, 16, dtype=torch.float64)
    (y, _, _), (ry, _, _) = run(moe, x, normalise=False)
    assert (y - ry).abs().max() > 1e-3


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.5])
def test_capacity_drops_match_reference(cf):
    moe = make_moe(moe_capacity_factor=cf, moe_top_k=2)
    x = torch.randn(30, 16, dtype=torch.float64)
    with torch.no_grad():
        y, _ = moe(x[None])
        ry, _, dropped = reference(moe, x)
    torch.testing.assert_close(y[0], ry, **TOL)
    assert moe.stats["dropped"] == dropped
    if cf < 1:
        assert dropped >= 30 * 2 - math.ceil(cf * 30 * 2 / 6) * 6   # at least what the slots cannot hold
        with torch.no_grad():
            y_free, _ = make_moe(moe_top_k=2)(x[None])                  # same weights, dropless
        assert (y - y_free).abs().max() > 1e-3                          # control: the drops change the output


def test_bias_update_step_and_balance():
    moe = make_moe(moe_bias_update_rate=0.05, moe_capacity_factor=1.0)
    moe.expert_bias.zero_()
    moe.train()
    x = torch.randn(200, 16, dtype=torch.float64) + 2.0                 # a shifted input: unbalanced routing
    with torch.no_grad():
        moe(x[None])
    load0, dropped0 = moe.load.clone(), moe.dropped
    spread0 = load0.max() - load0.min()
    assert spread0 > 0 and dropped0 > 0
    metrics = update_expert_bias(moe)
    torch.testing.assert_close(moe.expert_bias, 0.05 * torch.sign(load0.mean() - load0))
    assert metrics["moe//load_max_over_mean"] == pytest.approx(float(load0.max() / load0.mean()))
    assert metrics["moe//dropped"] == dropped0
    assert moe.load.sum() == 0 and moe.dropped == 0                     # reset after the update
    for _ in range(60):
        with torch.no_grad():
            moe(x[None])
        update_expert_bias(moe)
    assert moe.stats["load"].max() - moe.stats["load"].min() < spread0  # the bias spread the load
    # control: without the bias step the load stays as unbalanced as at first
    moe.expert_bias.zero_()
    with torch.no_grad():
        moe(x[None])
    assert moe.stats["load"].max() - moe.stats["load"].min() == spread0


def test_hybrid_lm_with_moe_trains_and_logs():
    torch.manual_seed(0)
    cfg = moe_cfg(num_layers=3, moe_first_dense=1, moe_aux_loss_coef=0.01, moe_shared_experts=1)
    model = HybridLM(cfg)
    assert [type(b.mlp).__name__ for b in model.layers] == ["SwiGLU", "MoE", "MoE"]
    ids = torch.randint(0, 64, (2, 32))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    out.loss.backward()
    assert model.layers[1].mlp.experts.gate.grad.abs().sum() > 0
    stats = update_expert_bias(model)
    assert set(stats) == {f"moe/{i}/{s}" for i in (1, 2) for s in ("load_max_over_mean", "aux_loss", "dropped")}
    assert stats["moe/1/load_max_over_mean"] >= 1.0 and stats["moe/1/dropped"] == 0
    assert stats["moe/1/aux_loss"] + stats["moe/2/aux_loss"] == pytest.approx(out.aux_loss.item())


def test_moe_under_autocast_routes_in_fp32(monkeypatch):
    import lsp.models.moe as moe_module
    moe = make_moe(moe_shared_experts=1).float()
    x = torch.randn(1, 8, 16)
    seen = []
    route = moe_module.route
    monkeypatch.setattr(moe_module, "route", lambda logits, *a: seen.append(logits.dtype) or route(logits, *a))
    with torch.no_grad():
        ref, _ = moe(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = moe(x)
    assert seen == [torch.float32, torch.float32]   # the router's logits, with and without autocast
    # the experts run in bf16 (errors ~1e-2) and their sum comes back in the residual stream's dtype
    assert y.dtype == torch.float32 and (y - ref).abs().max() < 0.1


@pytest.mark.parametrize("kw,key", [(dict(moe_top_k=7), "moe_top_k"), (dict(moe_capacity_factor=0.0),
                                    "moe_capacity_factor"), (dict(moe_router="relu"), "moe_router"),
                                    (dict(moe_first_dense=3), "moe_first_dense")])
def test_bad_moe_values_name_the_key(kw, key):
    with pytest.raises(ValueError, match=rf"^{key}[ :]"):
        moe_cfg(**kw)


@torch.no_grad()
def test_moe_decoding_equals_full_forward():
    # the MoE feed-forward is per token, so decoding from the caches gives the full forward's logits
    torch.manual_seed(0)
    model = HybridLM(moe_cfg(num_layers=3, layer_pattern="LSL", moe_shared_experts=1,
                             moe_router="sigmoid")).double().eval()
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    cache = model.new_cache()
    parts = [model(ids[:, :7], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                       for t in range(7, 20)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-10
    out = model.generate(ids[:, :5], 4)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], ids[:, :5])


@torch.no_grad()
def test_moe_export_round_trip_is_bitwise(tmp_path):
    # the exported folder (weights + the expert bias buffer + the moe_* config keys) rebuilds the same model
    from lsp.export import export_model, import_hf
    from lsp.train.tokenizer import IdTokenizer
    torch.manual_seed(0)
    model = HybridLM(moe_cfg(moe_shared_experts=1, moe_router="sigmoid", moe_bias_update_rate=0.01)).eval()
    model.layers[1].mlp.expert_bias.copy_(torch.randn(6))
    export_model(model, IdTokenizer(64), tmp_path)
    back = import_hf(str(tmp_path)).eval()
    assert back.cfg == model.cfg and back.cfg.moe_router == "sigmoid"
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(back(ids).logits, model(ids).logits)
    back.layers[1].mlp.expert_bias.zero_()   # control: the routing bias is part of what must round-trip
    assert not torch.equal(back(ids).logits, model(ids).logits)


def test_parameter_counts_are_the_whole_models_under_ep():
    """`lsp train`'s startup line: total and active parameters of the whole model, the same at ep = 2 (this rank
    keeps 2 of the 4 experts of each MoE block; the fake process group stands in for the other rank) as at
    ep = 1, and equal to the planner's count; control: the rank's own parameters are fewer."""
    from lsp.models.flops import matmul_parameters, num_parameters
    from lsp.models.moe import parameter_counts, use_expert_parallel
    from lsp.parallel.ep import EPContext
    from lsp.plan.measure import fake_process_group
    from lsp.plan.planner import model_parameters

    cfg = moe_cfg(num_layers=3, moe_first_dense=1, moe_shared_experts=1)
    total, active = parameter_counts(HybridLM(cfg))
    assert total == model_parameters(cfg) == num_parameters(HybridLM(cfg))
    assert total - active == matmul_parameters(cfg, active=False) - matmul_parameters(cfg)
    with fake_process_group(2):
        import torch.distributed as dist

        model = use_expert_parallel(HybridLM(cfg), EPContext(group=dist.new_group([0, 1])))
        assert model.layers[1].mlp.experts.gate.shape[0] == cfg.moe_experts // 2
        assert parameter_counts(model) == (total, active)
        assert num_parameters(model) < total
    assert parameter_counts(HybridLM(moe_cfg(moe_experts=0))) == (num_parameters(HybridLM(moe_cfg(moe_experts=0))),) * 2
