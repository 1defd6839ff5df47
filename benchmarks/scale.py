"""Evidence at the anchors' scale: 32K tokens per rank on W = 8 ... 256 ranks (docs/benchmarks_scale.md).

    # one fake-tensor step per (model, W) (`lsp plan --measure`'s measurement, minutes each on a CPU core),
    # merged into the JSON; the launch is the planner's recommendation at sp = W
    OMP_NUM_THREADS=1 python benchmarks/scale.py --measure 8 64 256
    # the tables (stdout) and the plot from the JSON and the planner's model
    python benchmarks/scale.py --plot docs/img/scale.png

Three models: the GLA hybrid (configs/hybrid-1.3b-1m-multinode.yaml), the Gated DeltaNet hybrid
(configs/hybrid-gdn-1.3b-128k.yaml) and the all-linear GLA model (the first with model.layer_pattern=L). For every
W: the launch the planner recommends with sp = W (dp = 1), its modelled memory, FLOPs and bytes per GPU
(lsp.plan.measure.modelled), the measured ones where the JSON has them, the tokens/s/GPU the planner predicts with
its H100 constants (lsp.plan.planner.Cluster), and the bytes one rank receives per layer and step next to fla's
context parallelism and Megatron's head all-to-all (lsp.plan.costmodel.fla_cp_bytes, megatron_a2a_bytes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lsp.plan.costmodel import Hardware, fla_cp_bytes, megatron_a2a_bytes, softmax_exchange_cost  # noqa: E402
from lsp.plan.measure import GB, measure, modelled  # noqa: E402
from lsp.plan.planner import Cluster, linear_exchange, recommend  # noqa: E402
from lsp.run_config import hybrid_config, load_config  # noqa: E402

JSON = os.path.join(ROOT, "benchmarks", "results", "scale.json")
WORLDS = (8, 16, 32, 64, 128, 256)
PER_RANK = 32768
MODELS = {"GLA hybrid": ("hybrid-1.3b-1m-multinode", []),
          "GDN hybrid": ("hybrid-gdn-1.3b-128k", []),
          "GLA all-linear": ("hybrid-1.3b-1m-multinode", ["model.layer_pattern=L"])}
# --quick (the test): the tiny configs, 32 tokens per rank
QUICK = dict(worlds=(2, 4), per_rank=32, models={"GLA hybrid": ("tiny-cpu", ["data.kind=mqar"]),
                                                 "GDN hybrid": ("tiny-gdn-cpu", [])})
# published tokens/s/GPU, 1B GLA at 32K tokens per GPU (ZeCO paper); LASP-2's Table 6 was not found (doc)
PUBLISHED = {8: {"ZeCO": 47369}, 256: {"ZeCO": 40967, "LASP-2": 25402}}


def launch(name: str, overrides: list, W: int, per_rank: int):
    """(cfg, mcfg, candidate): the config at T = W·per_rank with the planner's recommended launch at sp = W."""
    path = os.path.join(ROOT, "configs", f"{name}.yaml")
    T = W * per_rank
    base = overrides + [f"data.seq_len={T}", f"parallel.sp={W}", "parallel.dp=1"]
    cfg = load_config(path, base, check_files=False)
    best = recommend(cfg, Cluster(gpus=W), vocab_size=257, seq_len=T, sp_choices=[W])
    cfg = load_config(path, base + best.overrides().split(), check_files=False)
    return cfg, hybrid_config(cfg, 257), best


def _figures(m) -> dict:
    # a Measurement -> the JSON's numbers
    return {"peak_gb": m.peak / GB, "tflops": m.flops / 1e12, "comm_mb": {k: v / 1e6 for k, v in m.comm.items()}}


def measured_row(name: str, overrides: list, W: int, per_rank: int) -> dict:
    """One fake-tensor step of rank 0 (lsp.plan.measure.measure) of the recommended launch."""
    cfg, mcfg, best = launch(name, overrides, W, per_rank)
    got = measure(cfg, mcfg, W)
    return {**_figures(got), "memory_gb": {k: v / GB for k, v in got.memory.items()}, "seconds": got.seconds,
            "launch": best.overrides()}


def modelled_row(name: str, overrides: list, W: int, per_rank: int) -> dict:
    """The planner's figures for the recommended launch, its predicted tokens/s/GPU and per-layer bytes."""
    cfg, mcfg, best = launch(name, overrides, W, per_rank)
    p, b = cfg.parallel, cfg.train.micro_batch
    H, Hkv, Dh = mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim
    hw, t = Hardware(act_bytes=2), b * per_rank
    linear = 2 * linear_exchange(mcfg, hw, W, p.sp_method, b, 0.0, p.layout, p.scan_blocks)[1]
    softmax = softmax_exchange_cost(p.softmax_method, W, 2 * t * Hkv * Dh * 2, 0.0, 0.0, hw).bytes
    return {**_figures(modelled(cfg, mcfg, W)), "tokens_per_s_per_gpu": best.tokens_per_s_per_gpu,
            "method": p.sp_method, "softmax_method": p.softmax_method if "S" in mcfg.layer_types else "—",
            "checkpointing": best.checkpointing,
            "fits": best.fits, "layer_mb": {"lsp linear": linear / 1e6, "lsp softmax": softmax / 1e6,
                                            "fla CP": fla_cp_bytes(W, b * H, Dh, Dh) / 1e6,
                                            "Megatron a2a": megatron_a2a_bytes(W, t, H, Dh, Dh) / 1e6,
                                            "a2a possible": W <= H}}


def _comm(row) -> float:
    return sum(row["comm_mb"].values())


def tables(measured: dict, models: dict, worlds, per_rank: int) -> tuple[str, dict]:
    """Markdown tables (one per model, then bytes per layer, then the published figures) and the modelled rows."""
    out, rows = [], {}
    for label, (name, over) in models.items():
        out += [f"**{label}** ({name}{' ' + ' '.join(over) if over else ''}, {per_rank} tokens per rank)", "",
                "| W | T | linear / softmax SP | peak GB/GPU measured | modelled | TFLOP/step measured | modelled | "
                "comm MB/step measured | modelled | predicted tokens/s/GPU (H100 model) |", "|" + "---|" * 10]
        for W in worlds:
            r = rows[label, W] = modelled_row(name, over, W, per_rank)
            got = measured.get(f"{label}/{W}")
            m = (f"{got['peak_gb']:.2f}", f"{got['tflops']:.1f}", f"{_comm(got):.0f}") if got else ("—",) * 3
            out.append(f"| {W} | {W * per_rank:,} | {r['method']} / {r['softmax_method']} | {m[0]} | "
                       f"{r['peak_gb']:.2f} | {m[1]} | {r['tflops']:.1f} | {m[2]} | {_comm(r):.0f} | "
                       f"{r['tokens_per_s_per_gpu']:,.0f} |")
        out.append("")
    out += ["**Bytes one rank receives per layer and training step (forward + backward), MB**", "",
            "| model | W | lsp linear layer (method) | fla CP (K·(K+V) all-gather) | Megatron head all-to-all | "
            "lsp softmax layer (method) |", "|---|---|---|---|---|---|"]
    for (label, W), r in rows.items():
        lm = r["layer_mb"]
        a2a = f"{lm['Megatron a2a']:.1f}" if lm["a2a possible"] else f"({lm['Megatron a2a']:.1f}: W > heads)"
        soft = f"{lm['lsp softmax']:.1f} ({r['softmax_method']})" if "all-linear" not in label else "—"
        out.append(f"| {label} | {W} | {lm['lsp linear']:.2f} ({r['method']}) | {lm['fla CP']:.1f} | {a2a} | "
                   f"{soft} |")
    out += ["", "**tokens/s/GPU at 32K tokens per GPU: published (measured on GPUs) vs lsp predicted**", "",
            "| W | ZeCO 1B GLA (published) | LASP-2 (published) | " + " | ".join(
                f"{label} (lsp, predicted)" for label in models) + " |", "|" + "---|" * (3 + len(models))]
    for W in worlds:
        pub = PUBLISHED.get(W, {})
        cells = " | ".join(f"{rows[label, W]['tokens_per_s_per_gpu']:,.0f}" for label in models)
        z, lasp = (f"{pub[k]:,}" if k in pub else "—" for k in ("ZeCO", "LASP-2"))
        out.append(f"| {W} | {z} | {lasp} | {cells} |")
    return "\n".join(out), rows


def plot(path: str, measured: dict, rows: dict, models: dict, worlds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in models:
        ws = [W for W in worlds if f"{label}/{W}" in measured]
        line = axes[0].plot(worlds, [rows[label, W]["peak_gb"] for W in worlds], label=f"{label} (model)")[0]
        axes[0].plot(ws, [measured[f"{label}/{W}"]["peak_gb"] for W in ws], "o", color=line.get_color(),
                     label=f"{label} (measured, fake tensors)")
        axes[1].plot(worlds, [rows[label, W]["tokens_per_s_per_gpu"] for W in worlds], marker="o",
                     label=f"{label} (lsp, predicted)")
    pub = [(W, v) for W, d in PUBLISHED.items() for k, v in d.items() if k == "ZeCO" and W in worlds]
    if pub:
        axes[1].plot(*zip(*pub), "k^", label="ZeCO 1B GLA (published)")
    axes[0].set(xscale="log", xlabel="ranks W (32K tokens each)", ylabel="peak GB per GPU", title="memory")
    axes[1].set(xscale="log", xlabel="ranks W (32K tokens each)", ylabel="tokens/s/GPU", title="throughput")
    for ax in axes:
        ax.set_xticks(list(worlds), [str(W) for W in worlds])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", type=int, nargs="*", default=None, help="measure these W and merge into --json")
    ap.add_argument("--models", default=None, help="comma-separated model labels to measure (default all)")
    ap.add_argument("--json", default=JSON)
    ap.add_argument("--plot", default=None, help="write the PNG here")
    ap.add_argument("--quick", action="store_true", help="tiny configs, W = 2, 4 (the test)")
    args = ap.parse_args(argv)
    models = QUICK["models"] if args.quick else MODELS
    worlds, per_rank = (QUICK["worlds"], QUICK["per_rank"]) if args.quick else (WORLDS, PER_RANK)
    measured = json.load(open(args.json)) if os.path.exists(args.json) else {}
    if args.measure is not None:
        for label in (args.models.split(",") if args.models else models):
            for W in args.measure or worlds:
                measured[f"{label}/{W}"] = measured_row(*models[label], W, per_rank)
                print(f"{label} W={W}: {measured[f'{label}/{W}']}", flush=True)
                os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                with open(args.json, "w") as f:
                    json.dump(measured, f, indent=1, sort_keys=True)
    text, rows = tables(measured, models, worlds, per_rank)
    print(text)
    if args.plot:
        plot(args.plot, measured, rows, models, worlds)
    return measured, rows


if __name__ == "__main__":
    main()
