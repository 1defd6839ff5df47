"""What each rank writes and allocates when an expert-parallel run saves a checkpoint (docs/moe.md, "Checkpoints").

    python benchmarks/moe_checkpoint.py [--world 2] [key=value ...]   # configs/tiny-moe-cpu.yaml, parallel.ep=world

W gloo ranks build the config's trainer, take one training step (so the AdamW moments exist) and save a checkpoint
under the torch profiler. Per rank: the bytes of its DCP shard file (`__<rank>_0.distcp`) and the peak of the CPU
memory allocated during the save above what was allocated before it (the profiler's allocation events, summed
in time order), next to the bytes of the routed experts' weights and AdamW moments this rank holds.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MOE = os.path.join(REPO, "configs", "tiny-moe-cpu.yaml")


def peak_allocated(prof) -> int:
    """The highest running sum of the CPU allocations minus frees the profiler recorded, in time order (bytes)."""
    from torch._C._profiler import _EventType

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    allocations = sorted((n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                          if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
    live = peak = 0
    for node in allocations:
        live += node.extra_fields.alloc_size
        peak = max(peak, live)
    return peak


def save_on_rank(rank: int, world: int, overrides: list, root: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from lsp.run_config import load_config
    from lsp.train.trainer import Trainer

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    cfg = load_config(MOE, [f"out_dir={root}/run", f"parallel.sp={world}", f"parallel.ep={world}",
                            "logging.tqdm=false", "logging.plot=false", *overrides])
    trainer = Trainer(cfg)
    trainer.train_step()
    engine = trainer.engine
    held = sum(p.numel() * p.element_size() for p in engine.experts.params) * 3   # weights + 2 AdamW moments
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        path = trainer.save()
    shard = os.path.getsize(os.path.join(path, f"__{rank}_0.distcp"))
    return {"rank": rank, "distcp bytes written": shard, "peak bytes allocated in save": peak_allocated(prof),
            "expert bytes held (w + m + v)": held}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from benchmarks.common import print_table
    from lsp.parallel import spawn

    with tempfile.TemporaryDirectory() as root:
        rows = spawn(save_on_rank, args.world, args.overrides, root, timeout_s=600)
    title = f"checkpoint save, {os.path.basename(MOE)} at sp = ep = {args.world} ({' '.join(args.overrides)})"
    print_table(rows, title)


if __name__ == "__main__":
    main()
