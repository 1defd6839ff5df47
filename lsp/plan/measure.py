"""`lsp plan --measure`: one real-shape training step of rank 0 on fake tensors with a fake process group, counted.

Nothing is allocated and nothing is computed: the model is built and stepped (forward, backward, gradient clipping,
AdamW) under `FakeTensorMode` at the config's sequence length, model size and micro-batch, on the GPU code paths
(`lsp.ops.estimate.gpu_code_paths`, bf16 autocast unless train.precision=fp32), with every SP collective going
through lsp's comm layer over the `fake` backend (world size = the job's GPUs; collectives return at once). Counted:

* memory: torch's MemTracker peak, by category (parameters, gradients, optimizer state, activations, temporaries),
  at the instant whose total after the engine's sharding (`shard_states`) is largest: a sharding engine keeps only
  gradient shards, so its peak is early in backward, not at the end where the unsharded gradients are all alive.
  The optimizer state is created before the tracked step, so the peak is the steady state's.
* FLOPs: FlopCounterMode, in a second step on a fresh model (the Triton custom ops count with the formulas they
  register, `lsp.ops.linear.custom_ops.chunk_flops`) (its module hooks keep checkpointed blocks'
  recomputed activations alive, which would inflate the memory peak). The CPU flash-attention ops are counted with
  torch's own SDPA formulas: like torch, the full Tq x Tk score block, causal or not.
* comm: lsp.parallel.comm_stats() per tag: the linear SP exchange, the softmax K,V gathers, the MoE all-to-alls
  (`ep_all_to_all`); the dp reduction is recorded here from the parameter list (see below), the routed experts'
  over their world / ep replicas.
* MoE: routing is data, which fake tensors lack, so the router's choices count as uniform (`lsp.ops.moe.
  uniform_counts`) and, with parallel.ep > 1, every other rank of the fake process group as routing alike
  (`lsp.parallel.ep.exchange_counts`): the planner's assumption. Rank 0 keeps E / ep experts of each block, outside
  the engine's sharding (`_sharded`).

Engine sharding: DDP and FSDP2 do not run on fake CPU tensors (DDP's reducer reads storage, FSDP2's fully_shard
fails), so the step runs on the unwrapped model and the parameter / gradient / optimizer categories are then sharded
exactly as the engine shards them (its class's `shard_states`, lsp/engines.py), over all dp x sp ranks (the engines
average over the whole world).
Differences from a real GPU allocation: no caching-allocator rounding or fragmentation, no CUDA context / NCCL
buffers / kernel workspace (the planner's `reserve_gb`).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from lsp.engines import engine_spec

from .moe import all_to_all_bytes, expert_reduction_bytes, state_bytes

GB = 1e9
CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")
COMM_KINDS = ("sp_exchange", "kv_gather", "ep_all_to_all", "dp_reduction")


@dataclass
class Measurement:
    memory: dict          # category -> bytes per GPU at the peak (after the engine's sharding)
    flops: int            # one step (forward + backward), FlopCounterMode
    comm: dict            # COMM_KINDS -> bytes received per step on rank 0
    linear_backend: str   # the linear-attention path that ran
    seconds: float
    notes: list = field(default_factory=list)

    @property
    def peak(self) -> float:
        return sum(self.memory.values())


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while fn() runs (saved-tensor hooks; a storage
    saved by several nodes counts once). A real CPU step: the reference that `measure` is checked against."""
    import torch

    storages = {}

    def pack(t):
        if t.device.type != "meta":
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@contextlib.contextmanager
def fake_process_group(world: int):
    """torch.distributed on the `fake` backend as rank 0 of `world` ranks (every collective returns at once)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("lsp plan --measure needs a process without torch.distributed initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _flop_formulas() -> dict:
    # the CPU flash kernels have no formula in torch's registry; they do the work of the CUDA ones: torch's counts
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    from lsp.ops.delta.custom_ops import register_flop_formulas as delta_formulas
    from lsp.ops.dplr.custom_ops import register_flop_formulas as dplr_formulas
    from lsp.ops.linear.custom_ops import register_flop_formulas

    register_flop_formulas()     # the Triton custom ops count with their own formulas (registered in torch)
    delta_formulas()
    dplr_formulas()

    def forward(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def _peak_tracker(sharded_total):
    """torch's MemTracker keeping only the global peak, the instant where `sharded_total(snapshot)` (the bytes per
    GPU after the engine's sharding) is largest. Its per-module peaks walk every module at every op, which makes a
    full-size step quadratic (minutes); the global peak and its categories are all `lsp plan` reports. The instant
    matters: unsharded gradients grow through backward (peak at the first block) while a sharding engine keeps
    only their shards, so its peak comes early in backward, where every checkpointed block input is alive."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class PeakTracker(MemTracker):
        _peak_sharded = -1.0

        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                total = sharded_total(_categories(snap))
                if self._peak_sharded < total:
                    self._peak_sharded = total
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)

    return PeakTracker()


def _categories(snap: dict) -> dict:
    # a MemTracker snapshot -> our five categories (buffers and the rest count as temporaries)
    by = {str(getattr(k, "value", k)): v for k, v in snap.items()}
    return {"parameters": by.get("Parameter", 0), "gradients": by.get("Gradient", 0),
            "optimizer": by.get("Optstate", 0), "activations": by.get("Activation", 0),
            "temporaries": by.get("Temp", 0) + by.get("Buffer", 0) + by.get("Other", 0)}


def _peak_categories(tracker) -> dict:
    # MemTracker's peak snapshot -> our five categories
    return _categories(next(iter(tracker.get_tracker_snapshot("peak").values())))


def _comm_by_kind(stats: dict) -> dict:
    # comm_stats() tags -> the kinds the planner models (bytes received by rank 0); all_reduce_sum: the MoE
    # balancing loss's sums under SP (2E + 2 values, not modelled)
    out = dict.fromkeys(COMM_KINDS, 0)
    for key, c in stats["by_tag_op"].items():
        tag = key.split("/")[0].split(":")[0]
        kind = {"softmax_kv": "kv_gather", "softmax_ring": "kv_gather", "dp": "dp_reduction",
                "ep_counts": "ep_all_to_all", "ep_dispatch": "ep_all_to_all", "ep_combine": "ep_all_to_all",
                "all_reduce_sum": None}.get(tag, "sp_exchange")
        if kind:
            out[kind] += c["bytes_recv"]
    return out


def _expert_params(model) -> list:
    # the routed experts' parameters: reduced over their own replicas, outside the engine (docs/moe.md)
    from lsp.models.moe import expert_parameter_names

    params = dict(model.named_parameters())
    return [params[n] for n in expert_parameter_names(model)]


def _sharded(engine, unsharded: dict, zero: int, gpus: int, expert_bytes: float) -> dict:
    """The five categories after the engine's sharding (`shard_states`) of the dense parameters' states; the
    experts' (expert_bytes of fp32 weights, their gradients in proportion, AdamW m and v) stay whole on the rank:
    every engine leaves them to lsp.train.expert_parallel (no sharding, no gradient buckets)."""
    p = unsharded["parameters"]
    experts = {"parameters": expert_bytes, "optimizer": 2 * expert_bytes,
               "gradients": unsharded["gradients"] * expert_bytes / p if p else 0.0}
    dense = {k: unsharded[k] - experts[k] for k in experts}
    out = {**unsharded, **engine.shard_states(dense, zero, gpus)}
    return {k: v + experts.get(k, 0.0) for k, v in out.items()}


def build_step(cfg, mcfg, gpus: int, fake: bool = True):
    """(model, optimizer, sp context, inputs) of rank 0; under FakeTensorMode when the caller enters one."""
    import torch
    import torch.distributed as dist

    from lsp.models import HybridLM
    from lsp.models.build import build_optimizer
    from lsp.models.moe import use_expert_parallel
    from lsp.parallel import SPContext
    from lsp.parallel.ep import EPContext

    p, t = cfg.parallel, cfg.train
    torch.manual_seed(t.seed)
    model = HybridLM(mcfg)
    sp = None
    if p.sp > 1:
        group = dist.new_group(list(range(p.sp)))
        sp = SPContext(group=group, layout=p.layout, method=p.sp_method, scan_blocks=p.scan_blocks,
                       softmax_method=p.softmax_method)
    if p.ep > 1:   # rank 0's EP group, the first ep ranks (lsp.train.expert_parallel): it keeps E / ep experts
        use_expert_parallel(model, EPContext(group=dist.new_group(list(range(p.ep)))))
    optimizer = build_optimizer(cfg, model)   # after EP replaced the experts by this rank's rows
    T_local = cfg.data.seq_len // p.sp
    ids = torch.randint(0, mcfg.vocab_size, (t.micro_batch, T_local))
    labels = torch.randint(0, mcfg.vocab_size, (t.micro_batch, T_local))
    return model, optimizer, sp, ids, labels


def train_step(cfg, model, optimizer, sp, ids, labels, bf16: bool) -> None:
    """Forward, backward (loss scaled as the engines do: x sp / grad_accum), clip, AdamW step: one micro-batch."""
    import torch

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        out = model(ids, labels=labels, sp=sp)
    (out.loss * cfg.parallel.sp / cfg.train.grad_accum).backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()


def _init_optimizer_state(model, optimizer) -> None:
    # AdamW creates m, v at its first step: take one on zero gradients, so the tracked step is a steady-state one
    import torch

    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(cfg, mcfg, gpus: int) -> Measurement:
    """Rank 0's one training step of `cfg` on `gpus` GPUs (mcfg: its HybridConfig), on fake tensors; counted."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from lsp.ops.estimate import gpu_code_paths, measured_backend, measured_linear_backend
    from lsp.parallel import comm_stats, reset_comm_stats
    from lsp.parallel.comm import record

    p = cfg.parallel
    engine = engine_spec(p.engine)
    bf16 = cfg.train.precision != "fp32"    # auto = bf16 autocast on the GPU
    start = time.perf_counter()
    with fake_process_group(gpus), FakeTensorMode(), gpu_code_paths():
        # memory and bytes: one step under MemTracker
        model, optimizer, sp, ids, labels = build_step(cfg, mcfg, gpus)
        _init_optimizer_state(model, optimizer)
        expert_bytes = sum(q.numel() * q.element_size() for q in _expert_params(model))
        tracker = _peak_tracker(lambda c: sum(_sharded(engine, c, p.zero, gpus, expert_bytes).values()))
        tracker.track_external(model, optimizer)
        reset_comm_stats()
        with tracker:
            train_step(cfg, model, optimizer, sp, ids, labels, bf16)
        measured = _peak_categories(tracker)
        param_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
        record("all_reduce", "dp", 0, 0, engine.dp_reduction_bytes(param_bytes - expert_bytes, p.zero, gpus, bf16)
               + expert_reduction_bytes(expert_bytes, gpus, p.ep))
        comm = _comm_by_kind(comm_stats())
        # FLOPs: another step on a fresh model; FlopCounterMode's module hooks keep the recomputed activations of
        # checkpointed blocks alive until the end of backward, so it must not run beside MemTracker
        model, optimizer, sp, ids, labels = build_step(cfg, mcfg, gpus)
        flops = FlopCounterMode(display=False, custom_mapping=_flop_formulas())
        with flops:
            train_step(cfg, model, optimizer, sp, ids, labels, bf16)
    measured = _sharded(engine, measured, p.zero, gpus, expert_bytes)
    notes = [(f"GLA-family linear attention measured on the {measured_linear_backend()} path, delta-rule layers on "
              f"the {measured_backend('delta_rule')} path, DPLR layers on the {measured_backend('dplr_delta_rule')} "
              "path (the Triton kernels as torch custom ops, lsp/ops/{linear,delta,dplr}/custom_ops.py)"),
             f"engine {p.engine} (zero={p.zero}) sharding applied to the tracked parameter list over {gpus} ranks"]
    if cfg.data.kind != "mqar":
        notes.append("measured without document boundaries (cu_seqlens): a window inside one document")
    return Measurement(measured, int(flops.get_total_flops()), comm,
                       measured_linear_backend(), time.perf_counter() - start, notes)


def modelled(cfg, mcfg, gpus: int) -> Measurement:
    """The planner's analytic figures for the same launch (lsp.plan.planner / costmodel), in Measurement's form:
    memory split into states (parameters + gradients + optimizer) and activations, FLOPs, comm bytes by kind."""
    from lsp.models.flops import expert_parameters

    from .costmodel import Hardware, softmax_exchange_cost
    from .planner import (
        activation_bytes,
        counted_flops,
        linear_exchange,
        model_parameters,
    )

    p, t = cfg.parallel, cfg.train
    T, b, sp = cfg.data.seq_len, t.micro_batch, p.sp
    local = b * T // sp
    params = model_parameters(mcfg)
    experts = expert_parameters(mcfg) // p.ep        # this rank's shard of the routed experts (docs/moe.md)
    dense = params - expert_parameters(mcfg)
    engine = engine_spec(p.engine)
    memory = {"states": state_bytes(engine, p.zero, gpus, dense, experts),
              "activations": activation_bytes(mcfg, T, local, b, t.activation_checkpointing, p.layout,
                                              p.softmax_method, p.ep)}
    flops = counted_flops(mcfg, T, local, b, t.activation_checkpointing, p.layout)
    Hkv, Dh, types = mcfg.num_kv_heads, mcfg.head_dim, mcfg.layer_types
    act_bytes = 2 if t.precision != "fp32" else 4
    per_pass = sum(n * linear_exchange(mcfg, Hardware(act_bytes=act_bytes), sp, p.sp_method, b, 0.0, p.layout,
                                       p.scan_blocks, kind)[1] for kind, n in mcfg.linear_kind_counts().items())
    kv = 2 * local * Hkv * Dh * act_bytes     # one rank's K|V
    # softmax K|V traffic (LASP-2H: gather forward, reduce-scatter of the gathered gradients backward, (W-1) slots
    # each on NCCL and the fake backend, gloo all-reduces instead; ring: costmodel.softmax_exchange_cost), plus
    # the forward once more in a checkpoint recompute (K, V are not recorded)
    softmax = softmax_exchange_cost(p.softmax_method, sp, kv, 0.0, 0.0, Hardware(act_bytes=act_bytes)).bytes
    comm = {"sp_exchange": 2 * per_pass,
            "kv_gather": types.count("S") * (softmax + t.activation_checkpointing * (sp - 1) * kv),
            "ep_all_to_all": all_to_all_bytes(mcfg, local, p.ep, t.activation_checkpointing, act_bytes),
            "dp_reduction": engine.dp_reduction_bytes(4 * dense, p.zero, gpus, t.precision != "fp32")
            + expert_reduction_bytes(4 * experts, gpus, p.ep)}
    return Measurement(memory, int(flops), comm, "model", 0.0)


def report(cfg, gpus: int, got: Measurement, model: Measurement) -> str:
    """The table `lsp plan --measure` prints, headed by the step it measured (sequence length, dp x sp, micro-batch);
    its last line: peak memory per GPU, measured vs modelled."""
    def rel(a, b):
        return f"{(b - a) / a * 100:+.1f}%" if a else "n/a"

    p = cfg.parallel
    lines = [f"{cfg.name} on {gpus} GPUs (dp={gpus // p.sp} x sp={p.sp}), seq_len={cfg.data.seq_len} "
             f"({cfg.data.seq_len // p.sp} tokens per rank), micro_batch={cfg.train.micro_batch}, rank 0, one step "
             f"on fake tensors ({got.seconds:.0f} s):"]
    lines += [f"  note: {n}" for n in got.notes]
    lines.append("| quantity | measured | modelled | model vs measured |")
    lines.append("|---|---|---|---|")
    for c in CATEGORIES:
        lines.append(f"| memory: {c} GB | {got.memory[c] / GB:.4g} | | |")
    states = sum(got.memory[c] for c in CATEGORIES[:3])
    for label, a, b in (("memory: states (params+grads+optimizer) GB", states, model.memory["states"]),
                        ("memory: activations+temporaries GB", got.peak - states, model.memory["activations"]),
                        ("FLOPs per step (TFLOP)", got.flops / 1e12, model.flops / 1e12)):
        lines.append(f"| {label} | {a / (GB if 'GB' in label else 1):.4g} | "
                     f"{b / (GB if 'GB' in label else 1):.4g} | {rel(a, b)} |")
    for kind in COMM_KINDS:
        a, b = got.comm[kind], model.comm[kind]
        lines.append(f"| comm received: {kind} MB | {a / 1e6:.6g} | {b / 1e6:.6g} | {rel(a, b)} |")
    peak_model = sum(model.memory.values())
    lines.append(f"peak memory per GPU: measured {got.peak / GB:.4g} GB, modelled {peak_model / GB:.4g} GB "
                 f"({rel(got.peak, peak_model)})")
    return "\n".join(lines)
