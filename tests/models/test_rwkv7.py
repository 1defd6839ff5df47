"""The `rwkv7` kind: the layer against RWKV-7's time mixing written out token by token in fp64 (RWKV-LM's form: state
[V, K], w = -softplus(-z) - 1/2, decay exp(-exp w)), its value residual across layers and kinds, packed documents,
emulated SP equal to one device (token-shift halo included) with negative controls, decoding, export, the planner's
numbers and bad input.

Tolerances: fp64 throughout; the chunked WY path and the loop below differ by summation order only (~1e-15 relative
on outputs of size ~1), so 1e-10 / 1e-12 as in test_kda.py; decoding's 1e-10 is test_generate's.
"""
import pytest
import torch
import torch.nn.functional as F

from lsp.models import HybridConfig, HybridLM, layer_kind
from lsp.parallel import SPContext

from .kind_checks import check_decodes_as_full_forward, check_planner_prices, check_sp_needs_the_conv_halo
from .sp_workers import CFG, loss_and_grads, make_batch
from .test_model_sp import assert_same, check_emulated, check_gloo

RWKV = dict(linear_attn="rwkv7")


def rwkv7_model(pattern="LSL", **kw):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**{**CFG, **RWKV, "layer_pattern": pattern, **kw})).double()
    with torch.no_grad():     # every constant away from its init, so that each term is exercised
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("mix", "k_k", "k_a", "r_k", "norm_bias", "w0", "a0", "v0"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def reference_rwkv7(layer, x, v_first=None, shift=True, bonus=True):
    """RWKV-7 time mixing by RWKV-LM's equations, one document per row; x: [B, T, D]. v_first: the first layer's
    v [B, T, H·Dh] (None: this is the first layer). Returns (out [B, T, D], v before the residual). `shift` and
    `bonus` exist for the negative controls."""
    cfg = layer.cfg
    B, T, D = x.shape
    H, N = cfg.num_heads, cfg.head_dim
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1) if shift else x
    xr, xw, xk, xv, xa, xg = (x + (prev - x) * layer.mix[i] for i in range(6))
    r, k, v = layer.r_proj(xr), layer.k_proj(xk), layer.v_proj(xv)
    w = -F.softplus(-(layer.w0 + layer.w_up(torch.tanh(layer.w_down(xw))))) - 0.5
    a = torch.sigmoid(layer.a0 + layer.a_up(layer.a_down(xa)))
    g = layer.g_up(torch.sigmoid(layer.g_down(xg)))
    v_own = v
    if v_first is not None:
        v = v + (v_first - v) * torch.sigmoid(layer.v0 + layer.v_up(layer.v_down(xv)))
    kk = k * layer.k_k
    kk = (kk.view(B, T, H, N) / kk.view(B, T, H, N).norm(dim=-1, keepdim=True)).view(B, T, -1)
    k = k * (1 + (a - 1) * layer.k_a)
    decay = torch.exp(-torch.exp(w))
    heads = lambda t: t.view(B, T, H, N)  # noqa: E731
    r, k, v, kk, a, decay = map(heads, (r, k, v, kk, a, decay))
    S, outs = x.new_zeros(B, H, N, N), []          # S[b, h, value, key]
    for t in range(T):
        sa = torch.einsum("bhvk,bhk->bhv", S, -kk[:, t])                       # state · a, a = -κ̂
        S = (S * decay[:, t, :, None, :] + sa[..., None] * (kk[:, t] * a[:, t])[:, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        outs.append(torch.einsum("bhvk,bhk->bhv", S, r[:, t]))
    o = torch.stack(outs, 1)                                                     # [B, T, H, N]
    mean, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
    o = ((o - mean) / torch.sqrt(var + N * cfg.norm_eps)).reshape(B, T, -1) * layer.norm_weight + layer.norm_bias
    if bonus:
        o = o + ((r * k * layer.r_k).sum(-1, keepdim=True) * v).reshape(B, T, -1)
    return layer.o_proj(o * g), v_own


@pytest.mark.parametrize("index", [0, 2])
def test_layer_matches_the_rwkv7_recurrence(index):
    """Output and the gradients of x, v_first and every parameter in fp64, for the first rwkv7 layer (which sets
    v_first) and a later one (which mixes it in), then the negative controls."""
    layer = rwkv7_model().layers[index].attn
    assert layer.first == (index == 0)
    x = torch.randn(2, 70, CFG["hidden_size"], dtype=torch.float64, requires_grad=True)
    inner = CFG["hidden_size"]
    v_first = None if index == 0 else torch.randn(2, 70, inner, dtype=torch.float64, requires_grad=True)
    shared = {} if v_first is None else {"v_first": v_first}
    y = layer(x, shared=shared)
    ref, v_own = reference_rwkv7(layer, x, v_first)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    if index == 0:
        assert shared["v_first"] is not None and torch.equal(shared["v_first"], v_own)
    w = torch.randn_like(y)
    inputs = [x] + ([] if v_first is None else [v_first]) + list(layer.parameters())
    names = ["x"] + ([] if v_first is None else ["v_first"]) + [n for n, _ in layer.named_parameters()]
    got = torch.autograd.grad((y * w).sum(), inputs)
    want = torch.autograd.grad((ref * w).sum(), inputs)
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    # negative controls: no token shift, no bonus term, (later layer) no value residual each move the output by
    # more than 1% of its largest entry, 1e8 times the tolerance above
    with torch.no_grad():
        moved = lambda **kw: (y - reference_rwkv7(layer, x, **kw)[0]).abs().max() / y.abs().max()  # noqa: E731
        assert moved(v_first=v_first, shift=False) > 1e-2
        assert moved(v_first=v_first, bonus=False) > 1e-2
        if v_first is not None:
            assert moved(v_first=None) > 1e-2


def test_packed_documents_equal_separate_rows():
    """The token shift and the state restart at each document start (cu_seqlens), a one-token document included."""
    layer = rwkv7_model().layers[0].attn
    x = torch.randn(1, 50, CFG["hidden_size"], dtype=torch.float64)
    cu = [0, 1, 21, 50]
    with torch.no_grad():
        y = layer(x, cu_seqlens=torch.tensor(cu, dtype=torch.int32), shared={})
        for s, e in zip(cu[:-1], cu[1:]):
            torch.testing.assert_close(y[:, s:e], reference_rwkv7(layer, x[:, s:e])[0], rtol=1e-10, atol=1e-12)
        # control: the shift alone crossing the boundary (the state reset kept) is caught at the document's start
        y_crossing = layer(x, shared={})
        assert (y[:, 21] - y_crossing[:, 21]).abs().max() > 1e-3


@torch.no_grad()
def test_value_residual_crosses_other_kinds_in_a_model():
    """In HybridLM the first rwkv7 layer (position 1, after a gla layer) hands its v to the later one (across a
    softmax layer) through the forward's shared values: what the later layer reads is the first's v, and its output
    is the reference's with that v_first."""
    model = rwkv7_model(pattern="gla,rwkv7,S,rwkv7", num_layers=4)
    first, later = model.layers[1].attn, model.layers[3].attn
    assert first.first and not later.first and not hasattr(first, "v0") and hasattr(later, "v0")
    seen = {}
    first.register_forward_hook(lambda mod, args, out: seen.update(x_first=args[0]))
    later.register_forward_hook(lambda mod, args, kw, out: seen.update(x_later=args[0], out=out,
                                                                       v_first=kw["shared"]["v_first"]),
                                with_kwargs=True)
    model(make_batch(2, 40)[0])
    torch.testing.assert_close(seen["v_first"], reference_rwkv7(first, seen["x_first"])[1], rtol=0, atol=0)
    ref = reference_rwkv7(later, seen["x_later"], seen["v_first"])[0]
    torch.testing.assert_close(seen["out"], ref, rtol=1e-10, atol=1e-12)


def test_value_residual_survives_a_wrapper_that_rebuilds_block_inputs():
    """What FSDP2 does to each block's forward inputs (`_apply_to_tensors` over args and kwargs: every dict it walks
    is rebuilt) leaves the logits unchanged: the first rwkv7 layer writes into the forward's own shared values (with
    a plain dict it wrote into a copy and the later layer found no v_first). The real FSDP2 run is the slow test
    below."""
    from torch.distributed.utils import _apply_to_tensors

    model = rwkv7_model()
    ids = make_batch(2, 40)[0]
    with torch.no_grad():
        plain = model(ids).logits
        for block in model.layers:
            block.register_forward_pre_hook(lambda mod, args, kwargs: (_apply_to_tensors(lambda t: t, args),
                                                                       _apply_to_tensors(lambda t: t, kwargs)),
                                            with_kwargs=True)
        torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)


@pytest.mark.slow
def test_value_residual_reaches_later_layers_under_fsdp2_bf16():
    """FSDP2 (one gloo rank, bf16 param dtype, as lsp's fsdp engine wraps the model; 9 s on this CPU) casts each
    block's forward inputs and rebuilds the dicts among them: the first rwkv7 layer must still write into the
    forward's shared values (with a plain dict the later layer found no v_first: KeyError). The loss is the unwrapped
    model's under bf16 autocast, within bf16's rounding."""
    from lsp.parallel import spawn

    from . import sp_workers

    loss = spawn(sp_workers.fsdp2_bf16_loss, 1, RWKV, timeout_s=120)[0]
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**{**CFG, **RWKV}))
    ids, labels = make_batch(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(ids, labels=labels).loss.item()
    assert loss == pytest.approx(ref, rel=2e-2)


def test_layer_outside_a_model_needs_the_shared_values():
    layer = rwkv7_model().layers[2].attn
    with pytest.raises(ValueError, match="rwkv7 layer 2 shares its value residual .* pass shared="):
        layer(torch.randn(1, 8, CFG["hidden_size"], dtype=torch.float64))


@pytest.mark.parametrize("W, layout, method", [(2, "zigzag", "allgather"), (4, "contiguous", "allscan"),
                                               (4, "zigzag", "ring"), (2, "contiguous", "ring")])
def test_sp_equals_single_device(W, layout, method):
    """Loss and every parameter gradient under emulated SP equal sp=None in fp64 (check_emulated's assert_same,
    whose negative control is test_delta_layers.py::test_assert_same_is_not_vacuous)."""
    check_emulated(W, layout, method=method, **RWKV)


def test_sp_packed_documents():
    check_emulated(2, "zigzag", B=1, cu_seqlens=torch.tensor([0, 13, 40, 64], dtype=torch.int32), **RWKV)


def test_sp_of_a_kind_mix_with_checkpointing():
    """rwkv7 beside gla and softmax, every block recomputed in backward, equals one device without recompute."""
    overrides = dict(layer_pattern="rwkv7,gla,S,rwkv7", num_layers=4)
    torch.manual_seed(0)
    plain = HybridLM(HybridConfig(**{**CFG, **overrides})).double()
    ids, labels = make_batch(2, 64)
    ref = loss_and_grads(plain, ids, labels)
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**{**CFG, **overrides, "activation_checkpointing": True})).double()
    sp = SPContext(emulate=4, layout="zigzag", method="allscan")
    assert_same(*loss_and_grads(model, sp.shard(ids, 1), sp.shard(labels, 1), sp=sp), *ref)


@pytest.mark.slow
def test_gloo_two_ranks_equal_single_device():
    """Real processes (16 s on this CPU; the emulated cases above are its default-suite version): every linear SP
    method, zigzag, packed documents with a boundary inside a segment."""
    check_gloo(**RWKV)


def test_negative_control_sp_without_the_token_shift_halo_is_caught(monkeypatch):
    """Each rank shifting its own segment alone (zero before it instead of the previous segment's last token)
    must fail the SP comparison above."""
    check_sp_needs_the_conv_halo(monkeypatch, **RWKV)


def test_decodes_as_the_full_forward():
    model, ids, full = check_decodes_as_full_forward(num_layers=3, layer_pattern="LSL", **RWKV)
    with torch.no_grad():                     # negative control: a decode that loses the token shift's tail
        cache = model.new_cache()
        model(ids[:, :37], cache=cache)
        cache.layers[2].conv_tail = None
        assert (model(ids[:, 37:38], cache=cache).logits - full[:, 37:38]).abs().max() > 1e-6


def test_planner_prices_rwkv7():
    """Parameters exact (the first layer has no value-residual LoRA) and the exchange bytes with the token shift's
    halo: one token of D fp32 activations per row, two rwkv7 layers."""
    check_planner_prices(2 * CFG["hidden_size"] * 4, **RWKV)
    # a mix: two rwkv7 layers (one first) beside gla (no halo), each layer priced by its own kind (no softmax
    # layer: the check counts every exchange but the loss's all-reduce)
    check_planner_prices(2 * CFG["hidden_size"] * 4, layer_pattern="rwkv7,gla,rwkv7", num_layers=3)


@torch.no_grad()
def test_export_round_trip_keeps_logits(tmp_path):
    """`lsp export` then `import_hf` of an rwkv7 hybrid: the same config, the same logits; control: one changed
    value-residual parameter changes them (the Hugging Face load: tests/models/test_export.py)."""
    from lsp.export import export_model, import_hf
    from lsp.train.tokenizer import IdTokenizer

    model = rwkv7_model().float().eval()
    export_model(model, IdTokenizer(model.cfg.vocab_size), tmp_path)
    back = import_hf(str(tmp_path)).eval()
    assert back.cfg == model.cfg
    ids = torch.randint(0, CFG["vocab_size"], (2, 70), generator=torch.Generator().manual_seed(1))
    assert torch.equal(back(ids).logits, model(ids).logits)
    back.layers[2].attn.v0[0] += 1e-1
    assert not torch.equal(back(ids).logits, model(ids).logits)


def test_bf16_autocast_trains_and_follows_fp32():
    torch.manual_seed(0)
    layer = layer_kind("rwkv7")(HybridConfig(**{**CFG, **RWKV}), layer_idx=0)
    x = torch.randn(2, 40, CFG["hidden_size"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, shared={})
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and layer.w0.grad is not None
    torch.testing.assert_close(out.float(), layer(x, shared={}), rtol=0.05, atol=0.05)
