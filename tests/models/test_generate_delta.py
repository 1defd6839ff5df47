"""Recurrent decoding of DeltaNet / Gated DeltaNet layers (`DeltaState`) against the full forward.

Reference: the logits of one full forward (short conv over the whole sequence, chunked WY/UT delta rule from a zero
state). Decoding runs a prefill (the conv from a zero halo, the chunked op with `output_final_state`), optionally a
multi-token continuation (the conv from the cached tail, the chunked op from the cached state), then one token at a
time (`delta_step`, the step the naive reference loops over, and the conv from the cached tail). In fp64 the paths
differ by summation order only (~1e-16 on logits of size ~1): 1e-10 as in test_generate.py. The negative controls
(a cache that drops the conv tail, a step that forgets the decay) move the logits by more than 1e-6.
"""
import pytest
import torch

import lsp.models.cache as cache_mod
from lsp.models.cache import DeltaState, continue_conv
from lsp.ops.delta import short_conv

from .test_generate import TOL, decode_step_cost, decoded_logits, greedy_by_full_forward, tiny_model

DELTA_KINDS = ("deltanet", "gated_deltanet")
T = 80          # > one 64-token chunk


def ids_and_full(model, T=T):
    ids = torch.randint(0, 40, (2, T), generator=torch.Generator().manual_seed(1))
    return ids, model(ids).logits


@torch.no_grad()
@pytest.mark.parametrize("kind", DELTA_KINDS)
@pytest.mark.parametrize("splits", [(64,), (37,), (2,), (1,), (37, 77), (37, 39)],
                         ids=["prefill64", "prefill37", "prefill2", "prefill1", "prefill37+40", "prefill37+2"])
def test_delta_decoding_equals_full_forward(kind, splits):
    # 64 ends on a chunk boundary, 37 splits a chunk, 37 then 40 continues from the cached state across the boundary;
    # prefills of 2 and 1 tokens (and the 2-token continuation) are shorter than the conv's 3-input tail
    model = tiny_model(kind, pattern="LSL")
    ids, full = ids_and_full(model)
    assert (decoded_logits(model, ids, splits) - full).abs().max() < TOL


@torch.no_grad()
@pytest.mark.parametrize("kind", DELTA_KINDS)
def test_negative_control_cache_drops_conv_tail(kind):
    model = tiny_model(kind, pattern="LS")
    ids, full = ids_and_full(model)
    cache = model.new_cache()
    parts = [model(ids[:, :37], cache=cache).logits]
    assert cache.layers[0].conv_tail.shape == (2, model.cfg.delta_conv_size - 1, 3 * model.cfg.hidden_size)
    cache.layers[0].conv_tail = None                   # forget the last inputs: the conv restarts from zeros
    parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(37, T)]
    assert (torch.cat(parts, dim=1) - full).abs().max() > 1e-6


@torch.no_grad()
def test_negative_control_step_forgets_decay(monkeypatch):
    model = tiny_model("gated_deltanet", pattern="LS")
    ids, full = ids_and_full(model)
    step = cache_mod.delta_step
    monkeypatch.setattr(cache_mod, "delta_step", lambda q, k, v, beta, g, scale, S: step(q, k, v, beta, None, scale, S))
    assert (decoded_logits(model, ids, (37,)) - full).abs().max() > 1e-6


def test_continue_conv_equals_short_conv_in_pieces():
    # the conv alone: pieces of 1, 2 (< k - 1) and 5 tokens from the carried tail equal one pass over all 8
    torch.manual_seed(0)
    x, w = torch.randn(2, 8, 6, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    tail, ys = None, []
    for s, e in ((0, 1), (1, 3), (3, 8)):
        y, tail = continue_conv(x[:, s:e], w, tail)
        ys.append(y)
    assert torch.equal(tail, x[:, -3:])
    assert (torch.cat(ys, dim=1) - short_conv(x, w)).abs().max() < 1e-14
    # control: the same pieces each from a zero halo
    restarted = torch.cat([continue_conv(x[:, s:e], w, None)[0] for s, e in ((0, 1), (1, 3), (3, 8))], dim=1)
    assert (restarted - short_conv(x, w)).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("kind", DELTA_KINDS)
def test_delta_greedy_generate_equals_full_forward_loop(kind):
    model = tiny_model(kind, pattern="LLS")
    prompt = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, max_new_tokens=12)
    assert isinstance(model.new_cache().layers[0], DeltaState)
    assert torch.equal(out, greedy_by_full_forward(model, prompt, 12))
    forgetful = greedy_by_full_forward(model, prompt[:, -1:], 12)[:, 1:]   # control: without the prompt's state
    assert not torch.equal(out[:, 9:], forgetful)


@torch.no_grad()
def test_delta_decode_cost_does_not_grow_with_the_prefix():
    model = tiny_model("gated_deltanet", pattern="LL").float()
    flops, held = decode_step_cost(model, 16)
    assert (flops, held) == decode_step_cost(model, 300)
    # the cache holds per layer: B=1 x H x Dh x Dh fp32 state + (k - 1) x 3 H Dh conv inputs
    cfg = model.cfg
    per_layer = cfg.num_heads * cfg.head_dim ** 2 * 4 + (cfg.delta_conv_size - 1) * 3 * cfg.hidden_size * 4
    assert held == cfg.num_layers * per_layer
