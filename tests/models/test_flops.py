import torch.nn as nn

from lsp.models import HybridLM, flops_per_token, matmul_parameters, num_parameters


def test_counts_against_hand_count(tiny_cfg):
    # D=64, H=4, Hkv=2, Dh=16, I=192, layers "LS", GLA rank 16, vocab 128, untied
    cfg = tiny_cfg(layer_pattern="LS", num_layers=2)
    softmax = 64 * 64 * 2 + 64 * 32 * 2              # q, o + k, v (GQA)
    linear = 5 * 64 * 64 + 64 * 16 + 16 * 64         # q, k, v, gate, o + low-rank decay
    mlp = 3 * 64 * 192
    head = 128 * 64
    assert matmul_parameters(cfg) == softmax + linear + 2 * mlp + head == 116736
    model = HybridLM(cfg)
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert linears == matmul_parameters(cfg)  # the analytic count matches the built model
    extra = 128 * 64 + 2 * 2 * 64 + 64 + 16 + 64      # embedding, block norms, final norm, o_norm, decay bias
    assert num_parameters(model) == 116736 + extra
    assert num_parameters(model, exclude_embeddings=True) == 116736 + extra - 128 * 64
    T = 128
    want = 6 * 116736 + 6 * 4 * 16 * T + 6 * 4 * (64 * (16 + 16) + 2 * 16 * 16)
    assert flops_per_token(cfg, T) == want == 811008
    # negative control: softmax attention cost grows with T, linear does not
    cfg_s, cfg_l = tiny_cfg(layer_pattern="S"), tiny_cfg(layer_pattern="L")
    assert flops_per_token(cfg_s, 4096) - flops_per_token(cfg_s, 2048) == 4 * 6 * 4 * 16 * 2048
    assert flops_per_token(cfg_l, 4096) == flops_per_token(cfg_l, 2048)


def test_tied_counts_once(tiny_cfg):
    model = HybridLM(tiny_cfg(tie_embeddings=True))
    assert num_parameters(model) == sum(p.numel() for p in model.parameters())
    assert num_parameters(model, exclude_embeddings=True) == num_parameters(model) - 128 * 64


def test_moe_active_and_total_counts(tiny_cfg):
    # D=64; blocks 1..3 are MoE (first dense 1): router 64·8, top-2 of 8 experts + 1 shared of width 32
    cfg = tiny_cfg(moe_experts=8, moe_top_k=2, moe_shared_experts=1, moe_intermediate_size=32, moe_first_dense=1)
    dense = tiny_cfg()
    dense_mlp, expert = 3 * 64 * 192, 3 * 64 * 32
    active = matmul_parameters(dense) - 3 * dense_mlp + 3 * (64 * 8 + 3 * expert)
    total = matmul_parameters(dense) - 3 * dense_mlp + 3 * (64 * 8 + 9 * expert)
    assert matmul_parameters(cfg) == active and matmul_parameters(cfg, active=False) == total
    model = HybridLM(cfg)
    built = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    built += sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert built == total   # the analytic total matches the built model (router, shared, routed experts)
    assert flops_per_token(cfg, 128) - flops_per_token(dense, 128) == 6 * (active - matmul_parameters(dense))
