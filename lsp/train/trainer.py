"""The train loop: mesh -> model -> engine -> (resume) -> steps with grad accumulation -> eval -> checkpoint.

    for step in range(start, train.steps):
        for each of grad_accum micro-batches (this dp rank's rows, this sp rank's tokens):
            loss = model(ids, labels, sp, cu_seqlens).loss        # global mean over the whole sequence
            backward(loss * sp / grad_accum)                      # engines average over dp*sp -> sum_sp / dp
        clip, AdamW step, warmup+cosine schedule step
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, List, Optional

import torch

from lsp.names import IGNORE_INDEX
from lsp.ops.boundaries import device_boundaries
from lsp.run_config import Config, ConfigError, to_yaml, with_absolute_paths

from .checkpoint import latest_checkpoint
from .data import Batch, DataLoader
from .dist import Mesh, all_reduce_mean, all_reduce_sum, barrier, init_mesh
from .documents import corpus_of
from .engine import Engine
from .logger import RunLogger, peak_flops, peak_memory_gb
from .runs import set_aside_damaged
from .signals import StopRequested, StopSignals, signal_name
from .token_file import build_corpus_token_file
from .tokenizer import make_tokenizer


class NonFiniteError(RuntimeError):
    """NaN/inf in the loss or gradients with train.on_nonfinite=stop; str() is one line."""


def nonfinite_ranks(flags: torch.Tensor) -> Optional[str]:
    """None if every rank's loss and gradients are finite, else e.g. "loss on ranks [1], gradients on ranks [0, 1]"."""
    # flags: [3, world] from Trainer.step_flags
    ranks = [[r for r in range(flags.shape[1]) if flags[i, r] > 0] for i in range(2)]
    if not any(ranks):
        return None
    return ", ".join(f"{what} on ranks {r}" for what, r in zip(("loss", "gradients"), ranks) if r)


def stop_request(flags: torch.Tensor) -> Optional[str]:
    """"SIGTERM on ranks [0, 1]" when any rank was signalled during this step, else None (same on every rank)."""
    # flags: [3, world]; row 2 holds signal numbers
    ranks = [r for r in range(flags.shape[1]) if flags[2, r] > 0]
    if not ranks:
        return None
    return f"{signal_name(int(flags[2, ranks[0]]))} on ranks {ranks}"


def corpus_summary(cfg: Config, source, dp: int) -> str:
    """One line on what a files run trains on: documents, tokens, windows and their train / validation split, and
    how many epochs the configured steps make. source: the loader's packed token windows (lsp.train.data)."""
    t = cfg.train
    windows = source.num_train + source.num_val
    per_step = dp * t.micro_batch * t.grad_accum
    epochs = t.steps * per_step / source.num_train
    return (f"lsp: corpus {len(source.doc_starts) - 1:,} documents, {len(source.tokens):,} tokens (with "
            f"end-of-document ids) = {windows:,} windows of {source.seq_len} tokens: {source.num_train:,} train, "
            f"{source.num_val:,} validation (data.val_fraction={cfg.data.val_fraction:g}); {t.steps:,} steps x "
            f"{per_step:,} windows = {epochs:.3g} epochs")


def build_sp(cfg: Config, mesh: Mesh):
    if mesh.sp == 1:
        return None
    from lsp.parallel import SPContext
    p = cfg.parallel
    return SPContext(group=mesh.sp_group, layout=p.layout, method=p.sp_method, scan_blocks=p.scan_blocks,
                     softmax_method=p.softmax_method)


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on GPU (precision auto|bf16), fp32 on CPU unless bf16 is asked for explicitly."""
    p = cfg.train.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_name(cfg: Config, device: torch.device) -> str:
    return "bf16" if isinstance(autocast(cfg, device), torch.autocast) else "fp32"


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.mesh = mesh = init_mesh(cfg)
        torch.manual_seed(cfg.train.seed)   # same initial weights on every rank
        if cfg.data.kind != "mqar":   # every rank tokenises its share; they wait on files, not on a timed collective
            build_corpus_token_file(corpus_of(cfg.data), make_tokenizer(cfg.data.tokenizer), cfg.data.cache_dir,
                                    rank=mesh.rank, world=mesh.world)
        barrier(mesh)
        self.data = DataLoader(cfg, dp_rank=mesh.dp_rank, dp_size=mesh.dp)
        from lsp.models.build import build_model
        self.model = build_model(cfg, self.data.vocab_size)
        if cfg.init_from:   # trained weights to start from (a resumed checkpoint below replaces them)
            from .load import init_weights_from
            init_weights_from(self.model, cfg.init_from)
        self.model = self.model.to(mesh.device)
        self.sp = build_sp(cfg, mesh)
        self.engine = Engine(cfg, mesh, self.model)
        self.step = 0
        self.skipped_steps = 0   # updates skipped for non-finite loss/grads (train.on_nonfinite=skip)
        self.signals: Optional[StopSignals] = None   # set while fit() runs the loop
        self.ckpt_dir = cfg.checkpoint_dir
        if cfg.checkpoint.resume and (path := self.resume_point()) is not None:
            self.resume(path)

    # ------------------------------------------------------------------------------------------ checkpoint
    def resume_point(self) -> Optional[str]:
        """The newest intact checkpoint: rank 0 checks the manifests and sets newer damaged ones aside, one line each
        (runs.set_aside_damaged), while the others wait; then every rank reads the same folder."""
        error = ""
        if self.mesh.is_main:
            try:
                for note in set_aside_damaged(self.ckpt_dir)[1]:
                    print(note, flush=True)
            except ValueError as err:
                error = str(err)
        failed = all_reduce_sum(torch.tensor([float(bool(error))], device=self.mesh.device), self.mesh)
        if failed.item():
            raise ConfigError("checkpoint.resume", error or "rank 0 found every checkpoint damaged")
        return latest_checkpoint(self.ckpt_dir)

    def resume(self, path: str) -> None:
        try:
            state = self.engine.load(path)
        except ValueError as err:
            raise ConfigError("model", f"{err}; this run name is taken: pick a new name= (or out_dir=), or remove "
                              f"{self.cfg.run_dir} to start over") from None
        self.step = state["step"]
        self.data.state.step = state["data"]["step"]
        if self.mesh.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def save(self) -> Optional[str]:
        state = {"step": self.step, "data": {"step": self.data.state.step},
                 "world": {"dp": self.mesh.dp, "sp": self.mesh.sp}}
        return self.engine.save(self.ckpt_dir, self.step, state, to_yaml(with_absolute_paths(self.cfg)),
                               self.cfg.checkpoint.keep)

    # ------------------------------------------------------------------------------------------------ data
    def to_local(self, batch: Batch):
        """Move to device and keep this rank's SP shard of the tokens (cu_seqlens stay global)."""
        ids, labels = batch.input_ids.to(self.mesh.device), batch.labels.to(self.mesh.device)
        # the boundaries' device copy with their host list recorded: no layer reads them back (lsp.ops.boundaries)
        cu = device_boundaries(batch.cu_seqlens, self.mesh.device) if batch.cu_seqlens is not None else None
        if self.sp is not None:
            ids, labels = self.sp.shard(ids, dim=1), self.sp.shard(labels, dim=1)
        return ids, labels, cu

    # ------------------------------------------------------------------------------------------------ loop
    def train_step(self) -> Dict[str, float]:
        self.engine.model.train()
        micro = self.data.micro_batches(self.step)
        total = torch.zeros((), device=self.mesh.device, dtype=torch.float64)
        for i, batch in enumerate(micro):
            ids, labels, cu = self.to_local(batch)
            last = i == len(micro) - 1
            with self.engine.sync_context(last):
                loss = self.micro_loss(ids, labels, cu)
                self.engine.backward(loss)
            if not last:
                self.engine.micro_step()
            total += loss.detach().double()
        flags = self.step_flags(total)
        where = nonfinite_ranks(flags)
        if where:
            self.handle_nonfinite(where)
            grad_norm = None
        else:
            grad_norm = self.engine.step()
        moe = self.balance_experts()
        self.step += 1
        self.data.state.step = self.step
        # every SP rank holds the same global loss: averaging over all ranks = averaging over dp
        loss = all_reduce_mean((total / len(micro)).float(), self.mesh).item()
        return {"loss": loss, "grad_norm": grad_norm, "skipped_steps": self.skipped_steps,
                "stop": stop_request(flags), **moe}

    def balance_experts(self) -> Dict[str, float]:
        """MoE models: the aux-loss-free bias step after the update (load summed over all ranks; also after a skipped
        update, so the counts restart every step) and the step's per-layer MoE metrics."""
        if not self.model.cfg.moe_experts:
            return {}
        from lsp.models.moe import update_expert_bias
        return update_expert_bias(self.model, all_reduce_sum=lambda t: all_reduce_sum(t, self.mesh))

    def micro_loss(self, ids: torch.Tensor, labels: torch.Tensor, cu: Optional[torch.Tensor]) -> torch.Tensor:
        """The global-mean loss of one micro-batch of step self.step + 1 (the reliability tests wrap this seam to
        make it NaN on one rank: tests/reliability/faulty_entry.py)."""
        # ids, labels: [micro_batch, local tokens]; cu: global cu_seqlens or None -> []
        with autocast(self.cfg, self.mesh.device):
            return self.engine.model(ids, labels=labels, sp=self.sp, cu_seqlens=cu).loss

    def step_flags(self, total_loss: torch.Tensor) -> torch.Tensor:
        """[3, world] per-rank flags summed over all ranks: non-finite loss, non-finite gradients, and the number of
        a stop signal this rank received (0: none). One all-reduce, so every rank gets the same answer and takes the
        same branch (no hang, no divergence); the stop flag rides along instead of costing a collective of its own."""
        # stays on the device until the one host sync below (no per-parameter sync on GPU)
        flags = torch.zeros(3, self.mesh.world, device=self.mesh.device)   # [loss | grads | signal, rank]
        flags[0, self.mesh.rank] = (~torch.isfinite(total_loss)).float()
        grads = self.engine.local_grads()   # the all-reduce below covers the other ranks' shards
        if grads:
            flags[1, self.mesh.rank] = (~torch.stack([torch.isfinite(g).all() for g in grads])).any().float()
        flags[2, self.mesh.rank] = self.signals.received if self.signals is not None else 0
        return all_reduce_sum(flags, self.mesh).cpu()

    def handle_nonfinite(self, where: str) -> None:
        """on_nonfinite=skip: drop the gradients, no optimizer update (the schedule and data still advance);
        stop: raise NonFiniteError before anything is saved, so the last complete checkpoint stays the newest."""
        step = self.step + 1
        if self.cfg.train.on_nonfinite == "stop":
            self.engine.zero_grad()
            last = latest_checkpoint(self.ckpt_dir)
            raise NonFiniteError(f"non-finite {where} at step {step}; stopped because train.on_nonfinite=stop; "
                                 f"last complete checkpoint: {last or 'none'}")
        self.engine.skip_step()
        self.skipped_steps += 1
        print(f"lsp: rank {self.mesh.rank}: non-finite {where} at step {step}; update skipped "
              f"({self.skipped_steps} so far, train.on_nonfinite=skip)", flush=True)

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Mean held-out loss and, for MQAR, recall accuracy on the answer positions (argmax == value); {} for a run
        without validation windows (announced at its start)."""
        if not self.data.has_validation:
            return {}
        model = self.engine.eval_model()
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, device=self.mesh.device, dtype=torch.float64)   # loss, correct, answers
        for batch, counts in self.data.eval_batches():
            ids, labels, cu = self.to_local(batch)
            with autocast(self.cfg, self.mesh.device):
                out = model(ids, labels=labels, sp=self.sp, cu_seqlens=cu, return_logits=True)
            if counts:
                mask = labels != IGNORE_INDEX
                sums[0] += out.loss.double()
                sums[1] += ((out.logits.argmax(-1) == labels) & mask).sum()
                sums[2] += mask.sum()
        model.train(was_training)
        sums[0] /= self.mesh.sp   # the loss is already global over the SP group: count it once per SP group
        sums = all_reduce_sum(sums, self.mesh)
        metrics = {"eval_loss": sums[0].item() / self.cfg.data.eval_batches}
        if self.cfg.data.kind == "mqar":
            metrics["eval_accuracy"] = sums[1].item() / max(sums[2].item(), 1)
        return metrics

    def fit(self) -> Dict[str, Any]:
        cfg, mesh = self.cfg, self.mesh
        if not cfg.checkpoint.resume and self.step == 0 and latest_checkpoint(self.ckpt_dir) is not None:
            raise ConfigError("checkpoint.resume", f"false, but {self.ckpt_dir} already holds checkpoints of another "
                              "run; choose another name / out_dir / checkpoint.dir, or resume it")
        if self.step >= cfg.train.steps:
            if mesh.is_main:
                print(f"run {cfg.name} is already complete at step {self.step} (train.steps={cfg.train.steps}); "
                      "evaluating only. Raise train.steps to continue, or choose another name.", flush=True)
            return {"losses": [], "step": self.step, **self.evaluate()}
        logger = RunLogger(cfg, mesh.is_main, cfg.train.steps, self.step)
        try:
            self.announce()
            with StopSignals(cfg.checkpoint.save_on_signals) as self.signals:
                losses, last, stop = self.loop(logger)
        except BaseException:
            logger.close(exit_code=1)   # wandb says its last lines now, before the error line or traceback
            raise
        self.signals = None
        logger.close()
        if stop:
            raise StopRequested(f"{stop}: stopped after step {self.step}, checkpoint "
                                f"{latest_checkpoint(self.ckpt_dir)} written; run the same command again to resume")
        return {"losses": losses, "step": self.step, **last}

    def announce(self) -> None:
        from lsp.models.moe import parameter_counts
        mesh, cfg = self.mesh, self.cfg
        total, active = parameter_counts(self.model)   # the whole model's, not this rank's expert shard
        params = f"{total / 1e6:.2f}M params" + (f" ({active / 1e6:.2f}M active)" if active != total else "")
        if mesh.is_main:
            print(f"lsp: {params}, dp={mesh.dp} sp={mesh.sp} "
                  f"engine={cfg.parallel.engine} device={mesh.device.type} "
                  f"precision={precision_name(cfg, mesh.device)}, run dir {cfg.run_dir}", flush=True)
            if self.data.epoch_len is not None:   # a corpus of files (data.kind files / hf), not MQAR's stream
                print(corpus_summary(cfg, self.data.source, mesh.dp), flush=True)
        if mesh.is_main and not self.data.has_validation:
            source = self.data.source
            print(f"lsp: data.val_fraction={cfg.data.val_fraction} of {source.num_train + source.num_val} windows "
                  "leaves no validation window: training without evaluation (lsp eval RUN_DIR --files F measures "
                  "held-out files)", flush=True)

    def loop(self, logger: RunLogger):
        """Steps until train.steps, or until a stop signal: then that step is logged and saved at once.
        Returns (losses, last eval row, stop reason or None)."""
        cfg = self.cfg
        losses: List[float] = []
        last: Dict[str, Any] = {}
        self._clock = (time.perf_counter(), self.step)   # (time, step) of the last logged row, for tokens/s
        while self.step < cfg.train.steps:
            metrics = self.train_step()
            losses.append(metrics["loss"])
            logger.advance()
            at_end = self.step == cfg.train.steps
            stop = None if at_end else metrics["stop"]   # a signal during the last step changes nothing
            if self.step % cfg.train.log_every == 0 or at_end or stop:
                logger.log(self.metrics_row(metrics))
            if self.data.has_validation and ((cfg.train.eval_every and self.step % cfg.train.eval_every == 0)
                                             or at_end):
                last = {"step": self.step, **self.evaluate()}
                logger.log(last)
            if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or at_end or stop:
                self.save()
            if stop:
                return losses, last, stop
        return losses, last, None

    def metrics_row(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        """The metrics.jsonl row of this step: loss, lr, grad norm, throughput since the last row, memory, MFU."""
        from lsp.models import flops_per_token
        cfg, mesh = self.cfg, self.mesh
        t0, step0 = self._clock
        self._clock = (time.perf_counter(), self.step)
        tokens_per_step = mesh.dp * cfg.train.micro_batch * cfg.train.grad_accum * cfg.data.seq_len
        tok_s = tokens_per_step * (self.step - step0) / (self._clock[0] - t0)
        row = {"step": self.step, "loss": metrics["loss"], "lr": self.engine.lr,
               "grad_norm": metrics["grad_norm"], "tokens_per_s": tok_s,
               "peak_mem_gb": peak_memory_gb(mesh.device), "skipped_steps": self.skipped_steps}
        row.update({k: v for k, v in metrics.items() if k.startswith("moe/")})   # per MoE layer: load, aux, drops
        if (peak := peak_flops(cfg, mesh.device)):
            row["mfu"] = flops_per_token(self.model.cfg, cfg.data.seq_len) * tok_s / (peak * mesh.world)
        return row


def train(cfg: Config) -> Dict[str, Any]:
    return Trainer(cfg).fit()
