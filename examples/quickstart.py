"""The README's quickstart: one hybrid model, sharded over 4 emulated SP ranks, equals the unsharded model.

    python examples/quickstart.py
"""
import torch

from lsp.models import HybridConfig, HybridLM
from lsp.parallel import SPContext

torch.manual_seed(0)
cfg = HybridConfig(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                   layer_pattern="LLLS", linear_attn="gla")
model = HybridLM(cfg).double()
ids = torch.randint(0, 256, (2, 512))
labels = torch.roll(ids, -1, dims=1)                 # labels are aligned: labels[t] is the target of position t

ref = model(ids, labels=labels).loss                 # one device, whole sequence
for method in ("allgather", "allscan", "ring"):
    sp = SPContext(emulate=4, layout="zigzag", method=method)   # 4 virtual ranks here (real ranks: SPContext())
    loss = model(sp.shard(ids, dim=1), labels=sp.shard(labels, dim=1), sp=sp).loss
    print(f"{method:9s} loss {loss.item():.12f}  |sp - single| = {abs(loss - ref).item():.1e}")
    assert abs(loss - ref).item() < 1e-10
