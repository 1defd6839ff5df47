"""Recurrent decoding (`HybridLM.new_cache`, `forward(cache=...)`, `generate`) against the full forward.

Reference: the logits of one full forward over the whole sequence (chunked linear attention from a zero state,
causal SDPA). Decoding feeds the same tokens as a prefill (the chunked op with `output_final_state`), optionally a
multi-token continuation (the chunked op from the cached state), then one token at a time (the recurrence step and
one query against the KV cache). In fp64 the two differ only by summation order: ~1e-16 on logits of size ~1, so
1e-10 leaves six orders of margin while the negative controls below miss by more than 1e-6
(a small-init model: a one-position RoPE error moves the logits by ~5e-5).
"""
import dataclasses

import pytest
import torch

from lsp.models import HybridConfig, HybridLM
from lsp.models.generate import filter_logits
from lsp.models.kinds._decay import DecayKind

LINEAR_KINDS = ("linear", "lightning", "simple_gla", "gla")
T = 80          # > one 64-token chunk
TOL = 1e-10


def tiny_model(kind="gla", pattern="LS", seed=0):
    # GQA on the softmax layer: 4 query heads share 2 KV heads
    cfg = HybridConfig(vocab_size=40, hidden_size=32, num_layers=len(pattern), num_heads=4, num_kv_heads=2,
                       layer_pattern=pattern, linear_attn=kind)
    torch.manual_seed(seed)
    return HybridLM(cfg).double().eval()


def decoded_logits(model, ids, splits, shift_after_prefill=0):
    """Logits [B, T, V] of consuming ids in pieces: ids[:, s_i:s_{i+1}] for the given split points, then one token
    at a time. shift_after_prefill moves the cache's position counter (a deliberately wrong decode)."""
    cache, parts, start = model.new_cache(), [], 0
    for end in list(splits) + list(range(splits[-1] + 1, ids.shape[1] + 1)):
        parts.append(model(ids[:, start:end], cache=cache).logits)
        if start == 0:
            cache.seen += shift_after_prefill
        start = end
    return torch.cat(parts, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("kind", LINEAR_KINDS)
@pytest.mark.parametrize("splits", [(64,), (37,), (1,), (37, 77)], ids=["prefill64", "prefill37", "prefill1",
                                                                        "prefill37+40"])
def test_decoding_equals_full_forward(kind, splits):
    # prefill 64 ends on a chunk boundary; 37 splits the first chunk; 37 then 40 more continues mid-chunk from the
    # cached state across the boundary; 1 decodes (almost) everything by recurrence
    model = tiny_model(kind, pattern="LSL")
    ids = torch.randint(0, 40, (2, T), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    assert (decoded_logits(model, ids, splits) - full).abs().max() < TOL


@torch.no_grad()
def test_negative_control_forgotten_decay(monkeypatch):
    model = tiny_model("gla")
    ids = torch.randint(0, 40, (2, T), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    step = DecayKind.recurrence.step
    forgetful = dataclasses.replace(DecayKind.recurrence, step=lambda q, k, v, g, scale, state: step(q, k, v, None,
                                                                                                       scale, state))
    monkeypatch.setattr(DecayKind, "recurrence", forgetful)
    assert (decoded_logits(model, ids, (37,)) - full).abs().max() > 1e-6


@torch.no_grad()
def test_negative_control_wrong_rope_position():
    model = tiny_model("gla")
    ids = torch.randint(0, 40, (2, T), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    assert (decoded_logits(model, ids, (37,)) - full).abs().max() < TOL
    assert (decoded_logits(model, ids, (37,), shift_after_prefill=1) - full).abs().max() > 1e-6


def greedy_by_full_forward(model, ids, n):
    # the slow reference: re-run the whole prefix for every token
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
def test_greedy_generate_equals_full_forward_loop():
    model = tiny_model("gla", pattern="LLS")
    prompt = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, max_new_tokens=12)
    assert out.shape == (3, 21) and torch.equal(out[:, :9], prompt)
    assert torch.equal(out, greedy_by_full_forward(model, prompt, 12))
    # control: decoding without the prompt's state (the last token only) gives another continuation
    forgetful = greedy_by_full_forward(model, prompt[:, -1:], 12)[:, 1:]
    assert not torch.equal(out[:, 9:], forgetful)


@torch.no_grad()
def test_sampling_options():
    model = tiny_model("simple_gla")
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(3))
    greedy = model.generate(prompt, 8)
    assert torch.equal(model.generate(prompt, 8, temperature=1.5, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 8, temperature=1.5, top_p=1e-6), greedy)
    a = model.generate(prompt, 8, temperature=2.0, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 8, temperature=2.0, generator=torch.Generator().manual_seed(0))
    c = model.generate(prompt, 8, temperature=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_filter_logits_matches_definition():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    probs = logits.softmax(-1)[0]   # sorted order: ids 1, 3, 2, 0, 4

    def kept(f):
        return torch.isfinite(f)[0].nonzero().flatten().tolist()

    assert kept(filter_logits(logits, 2, None)) == [1, 3]
    # nucleus: the smallest top set whose mass reaches p
    p = (probs[1] + probs[3]).item()
    assert kept(filter_logits(logits, None, p - 1e-6)) == [1, 3]
    assert kept(filter_logits(logits, None, p + 1e-6)) == [1, 2, 3]
    assert kept(filter_logits(logits, None, 1.0)) == [0, 1, 2, 3, 4]


def test_eos_stops_and_pads():
    model = tiny_model("lightning")
    prompt = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(4))
    free = model.generate(prompt, 6)
    eos = int(free[0, 5])                       # row 0's second generated token becomes the end of text
    out = model.generate(prompt, 6, eos_id=eos)
    assert torch.equal(out[0, :6], free[0, :6]) and (out[0, 6:] == eos).all()


@pytest.mark.parametrize("kwargs, name", [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"),
                                          ({"top_p": 1.5}, "top_p")])
def test_bad_sampling_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        tiny_model().generate(torch.zeros(1, 3, dtype=torch.long), 2, **kwargs)


def test_cache_refuses_sp_and_packing():
    model = tiny_model()
    with pytest.raises(ValueError, match="cu_seqlens=None"):
        model(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32),
              cache=model.new_cache())


def decode_step_cost(model, prefix):
    # -> (FLOPs of one decode step, bytes held by the cache) after a random prefix of `prefix` tokens
    from torch.utils.flop_counter import FlopCounterMode
    cache = model.new_cache()
    model(torch.randint(0, 40, (1, prefix)), cache=cache)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    held = sum(t.numel() * t.element_size() for c in cache.layers for t in vars(c).values() if torch.is_tensor(t))
    return counter.get_total_flops(), held


@torch.no_grad()
def test_linear_decode_cost_does_not_grow_with_the_prefix():
    linear = tiny_model("gla", pattern="LL").float()
    assert decode_step_cost(linear, 16) == decode_step_cost(linear, 300)
    # control: a softmax layer's KV cache grows with the prefix
    hybrid = tiny_model("gla", pattern="LS").float()
    assert decode_step_cost(hybrid, 16)[1] < decode_step_cost(hybrid, 300)[1]


def test_generate_benchmark_quick():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "generate.py")
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--steps", "2", "--rounds", "1"])
    linear = [r for r in rows if r["pattern"] == "L"]
    assert linear[0]["MFLOP/token"] == linear[1]["MFLOP/token"] and linear[0]["cache KB"] == linear[1]["cache KB"]
    assert all(r["ms/token"] > 0 for r in rows)


def test_layer_without_decode_path_is_named():
    model = tiny_model()
    model.layers[0].attn = torch.nn.Identity()   # stands for a layer kind that has no new_cache() yet
    with pytest.raises(ValueError, match="decoding is not implemented for Identity layers"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2)
