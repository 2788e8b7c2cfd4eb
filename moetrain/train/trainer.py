"""The training loop: build everything from the config, then step, log, evaluate.

Per optimizer step each data-parallel rank runs its ``global / (micro x dp)`` micro-batches —
one after another (gradient accumulation), or as the pipeline's micro-batches with PP. Every
micro-batch's LM loss is scaled by 1 / (micro-batches in the global batch), and so is its
aux-loss gradient (``MoELayer.aux_loss_scale``); data-parallel gradient reductions sum. The
result is the single-process step over the same micro-batches (the correctness contract,
docs/parallelism.md). Rank 0 logs; statistics are summed over stages and data-parallel ranks
first.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from moetrain.config.schema import Config
from moetrain.config.validate import expert_placement, parallel_dims
from moetrain.data import BatchIterator, build_datasets, build_tokenizer
from moetrain.data.prefetch import PrefetchingBatches
from moetrain.models import Transformer
from moetrain.models.documents import document_inputs
from moetrain.parallel import activity
from moetrain.parallel.context import ParallelContext, close_parallel, init_parallel
from moetrain.parallel.parallelize import parallelize
from moetrain.parallel.pipeline import build_schedule, pipeline_forward
from moetrain.train import checkpointing
from moetrain.train.callbacks import (
    Callback,
    MemoryStatistics,
    MoEStatistics,
    PlacementStatistics,
    RunReport,
    StragglerStatistics,
)
from moetrain.train.data_stats import DataStatistics
from moetrain.train.lr import build_scheduler
from moetrain.train.memory import peak_memory
from moetrain.train.metrics import MetricsWriter, bits_per_token, console_line
from moetrain.train.nonfinite import NonFiniteGuard
from moetrain.train.optim import build_optimizer
from moetrain.train.profiler import ProfileSteps
from moetrain.train.run_meta import val_history, write_run_meta
from moetrain.train.tensorboard import open_tensorboard
from moetrain.train.throughput import (
    PeakFlops,
    ThroughputWindow,
    model_flops_utilization,
    peak_flops_per_device,
)
from moetrain.train.tracking import Tracker
from moetrain.train.watchdog import Watchdog


@dataclass
class TrainResult:
    run_dir: Path
    losses: list[float]  # training LM loss per step
    val_losses: list[tuple[int, float]]  # (step, validation loss) of this process
    # every validation of the run, earlier processes' (before a resume) included: read back
    # from metrics.jsonl on the logging rank; this process's val_losses elsewhere
    val_history: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: Path | None = None  # the newest checkpoint this process saved or resumed from


class Trainer:
    """``Trainer(cfg, run_dir)`` builds data, model, optimizer and schedule for this process's
    place in the launch (``ctx``; by default joined from the torchrun environment).
    ``callbacks`` run after the built-in ones (MoE and placement statistics, the expert-load
    heatmap)."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        ctx: ParallelContext | None = None,
        callbacks: list[Callback] | None = None,
    ) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        t = cfg.train
        self.ctx = ctx or init_parallel(parallel_dims(cfg), cfg.parallel.timeout_s)
        torch.manual_seed(t.seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        self._build_data()
        self._build_model()
        self.callbacks: list[Callback] = [
            MoEStatistics(self.moe_layers, self.pm.moe_ids, cfg.model, t.seq_len),
            *(PlacementStatistics(s) for s in self.pm.step_statistics()),
            RunReport(run_dir, self.ctx.is_logging_rank),  # report.html, expert_load.png
            StragglerStatistics(),  # before any callback whose collective syncs the ranks
            MemoryStatistics(),
            DataStatistics(),
            ProfileSteps(t.profile_steps, run_dir, self.ctx.rank),
            *(callbacks or []),
        ]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, t.steps, cfg.optim)
        self.schedule = None
        if self.ctx.dims.pp > 1:
            self._pp_losses: list[torch.Tensor] = []
            self.schedule = build_schedule(
                self.pm,
                self.ctx,
                cfg.parallel.pp_schedule,
                self.num_micro // self.ctx.dims.dp,
                self._pp_loss,
                t.micro_batch_size,
                t.seq_len // self.ctx.dims.cp,  # this rank's part of each sequence
            )
        self.step = 0  # optimizer steps taken (restored on resume)
        self.nonfinite = NonFiniteGuard(t.nonfinite, t.max_skipped_steps, self.ctx.is_logging_rank)
        self._nonfinite_ranks: list[int | None] = [None, None]
        self.wandb_run_id: str | None = None
        self.resumed_from: Path | None = None
        self.last_checkpoint: Path | None = None  # saved or resumed from by this process
        self.last_checkpoint_step: int | None = None
        self.peak = PeakFlops(0.0, "not measured on this rank")  # rows are written on rank 0
        if self.ctx.is_logging_rank:
            self.peak = peak_flops_per_device(t.peak_flops_per_device, self.ctx.device)
        self.peak_flops, self.peak_source = self.peak.value, self.peak.source
        self.autocast = (
            torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
            if t.dtype == "bf16"
            else contextlib.nullcontext()
        )
        self.setup_memory = peak_memory(self.ctx)  # collective: the set-up peak over ranks

    def _build_data(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        train_data, self.val_data, self.data_meta = build_datasets(
            cfg.data, self.tokenizer, t.seq_len, cfg.model.vocab_size
        )
        # every rank draws the same indices; the sampler's position is training state
        self.data_sampler = train_data.sampler(t.seed)
        self.data_sampler.name = cfg.data.source  # a mixture names its sources itself
        batches = BatchIterator(
            train_data,
            self.data_sampler,
            t.micro_batch_size,
            dp_rank=self.ctx.dp_rank,
            dp_size=self.ctx.dims.dp,
        )
        # assembled ahead of the step by a background thread (data.prefetch batches)
        self.train_batches = PrefetchingBatches(batches, t.global_batch_size, cfg.data.prefetch)

    def _build_model(self) -> None:
        """The model is built on the meta device, cut and sharded by the layout, and only then
        does this rank allocate and initialize its own shards (``ParallelModel.materialize``:
        the weights equal the single-process model's whatever the layout); then
        ``checkpoint.init_from`` weights are read into them."""
        cfg, t = self.cfg, self.cfg.train
        with torch.device("meta"):
            model = Transformer(cfg.model)  # draws its init seed from the global RNG
        specs, seed = model.init_specs(), model.init_seed
        self.num_params, self.num_active_params = model.num_params(), model.num_active_params()
        self.flops_per_token = model.flops_per_token(t.seq_len)
        self.placement = expert_placement(cfg)
        self.pm = parallelize(
            model,
            self.ctx,
            cfg.parallel.activation_checkpointing,
            cfg.parallel.pp_virtual_stages,
            self.placement,
            compile_blocks=t.compile,
        )
        self.pm.materialize(specs, seed)
        self.model = self.pm.module
        self.moe_layers = self.pm.moe_layers
        self.num_moe_layers = cfg.model.num_moe_layers
        self.num_micro = t.global_batch_size // t.micro_batch_size  # over all dp ranks
        self.loss_scale = 1.0 / self.num_micro
        self.pm.prepare_training(aux_loss_scale=self.loss_scale, seed=t.seed)
        self.state_module = self.pm.state_module()
        if cfg.checkpoint.init_from:  # weights only; a fresh run otherwise
            checkpointing.init_from(self, cfg.checkpoint.init_from)

    def run(self) -> TrainResult:
        """Resume if there is a checkpoint, then train to ``train.steps``: log, evaluate and
        checkpoint at their intervals, then save the final checkpoint (``checkpoint.final``).
        Raises ``NonFiniteError`` as ``train.nonfinite`` says (the metrics file and the tracker
        are closed first; no checkpoint is saved after it)."""
        cfg = self.cfg
        logging_rank = self.ctx.is_logging_rank
        self.resume()
        if logging_rank:
            write_run_meta(self)
        tracker = Tracker(
            cfg.logging.wandb.mode if logging_rank else "disabled",
            cfg.logging.wandb.project,
            cfg.logging.wandb.entity,
            self.run_dir,
            dict(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)),  # type: ignore[arg-type]
            run_id=self.wandb_run_id,  # a resumed run continues its wandb run
            tensorboard=open_tensorboard(
                cfg.logging.tensorboard and logging_rank, self.run_dir, self.step or None
            ),
        )
        self.wandb_run_id = tracker.run_id
        writer = None
        if logging_rank:
            writer = MetricsWriter(
                self.run_dir, resume_step=self.step if self.resumed_from else None
            )
        # a step, eval or save longer than parallel.timeout_s ends the run with a diagnosis
        watchdog = Watchdog(
            self.run_dir, self.ctx.rank, self.ctx.dims.world_size, cfg.parallel.timeout_s
        )
        watchdog.start()
        try:
            result = self._train(writer, tracker, watchdog)
        finally:
            watchdog.stop()
            self.train_batches.close()
            if writer is not None:
                writer.close()
            tracker.finish()
        result.val_history = result.val_losses
        if writer is not None:  # and the earlier processes' (before a resume)
            result.val_history = val_history(writer.path) or result.val_losses
        result.checkpoint = self.last_checkpoint
        return result

    def _train(
        self, writer: MetricsWriter | None, tracker: Tracker, watchdog: Watchdog
    ) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        losses: list[float] = []
        val_losses = self._start(writer, tracker, watchdog)
        bar = tqdm(
            range(self.step + 1, t.steps + 1),
            disable=not (cfg.logging.progress_bar and self.ctx.is_logging_rank),
            desc="train",
            dynamic_ncols=True,
        )
        window = ThroughputWindow(time.perf_counter())  # tok/s and MFU: since the last row
        for step in bar:
            watchdog.step_begin(step)
            for callback in self.callbacks:
                callback.pre_step(self, step)
            stats, grad_norm, lr = self.train_step()
            window.add_step(t.global_batch_size * t.seq_len)
            losses.append(stats["loss"])
            row = None
            if step % t.log_interval == 0 or step == t.steps:
                row = self._log_row(step, stats, grad_norm, lr, window.take(time.perf_counter()))
                if writer is not None:
                    writer.write(row)
                    bar.write(console_line(row))
                tracker.log(row, step)
            for callback in self.callbacks:
                callback.post_step(self, step, row)
            with window.paused():  # evaluations and saves are not training throughput
                if step == t.steps or (t.eval_interval and step % t.eval_interval == 0):
                    watchdog.step_begin(step)  # the eval gets its own limit
                    val_losses.append((step, self._evaluate_and_log(step, writer, tracker, bar)))
                if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                    watchdog.step_begin(step)  # and so does the save
                    self.save_checkpoint()
            watchdog.step_end()
        self._finish(tracker, watchdog)
        return TrainResult(self.run_dir, losses, val_losses)

    def _start(
        self, writer: MetricsWriter | None, tracker: Tracker, watchdog: Watchdog
    ) -> list[tuple[int, float]]:
        """Before the first step: a fresh run's step-0 validation (returned), the callbacks'
        ``pre_train``."""
        val_losses: list[tuple[int, float]] = []
        if self.resumed_from is None:
            watchdog.step_begin(0)
            val_losses.append((0, self._evaluate_and_log(0, writer, tracker)))  # the start point
        elif self.step >= self.cfg.train.steps:
            checkpointing.announce(
                self.ctx.is_logging_rank,
                f"nothing to train: resumed at step {self.step} with train.steps="
                f"{self.cfg.train.steps}; raise train.steps to train on",
            )
        for callback in self.callbacks:
            callback.pre_train(self)
        return val_losses

    def _finish(self, tracker: Tracker, watchdog: Watchdog) -> None:
        """After the last step: the final checkpoint (``checkpoint.final``; not again when the
        last step was saved or resumed from), the callbacks' ``post_train``."""
        if self.cfg.checkpoint.final and self.last_checkpoint_step != self.step:
            watchdog.step_begin(self.step)  # the save gets its own limit
            self.save_checkpoint()
            watchdog.step_end()
        for callback in self.callbacks:
            callback.post_train(self, tracker)

    # --- checkpoints ----------------------------------------------------------------------------

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _layout(self) -> dict[str, int | str]:
        """The layout as a checkpoint records it (``ParallelDims.layout``)."""
        return self.ctx.dims.layout(self.cfg.parallel.pp_virtual_stages)

    def save_checkpoint(self) -> Path:
        """Checkpoint the state after ``self.step`` steps (every rank calls this; announced on
        the logging rank). Weights that are not finite are never saved: ``NonFiniteError``
        instead."""
        return checkpointing.save(self)

    def resume(self) -> Path | None:
        """Load the checkpoint ``checkpoint.resume`` names (auto: the newest complete one in the
        run dir, if any) and continue from its step."""
        return checkpointing.resume(self)

    def close(self) -> None:
        """Stop the batch prefetcher; leave the process group the trainer joined (no-op in one
        process)."""
        self.train_batches.close()
        close_parallel(self.ctx)

    def train_step(self) -> tuple[dict[str, Any], float, float]:
        """One optimizer step over this rank's micro-batches of the next global batch.
        Returns the step's statistics (the row fields: ``loss`` and the callbacks', summed over
        ranks), the global grad norm and the lr. A non-finite loss or gradient norm stops the
        run (``NonFiniteError``) or skips the update, as ``train.nonfinite`` says."""
        t = self.cfg.train
        batches = [
            (self._local(x), self._local(y))
            for x, y in self.train_batches.next_global_batch(t.global_batch_size)
        ]
        for chunk in self.pm.chunks:
            chunk.train()
        self.pm.start_step(self.step)
        if self.schedule is None:
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
            for i, (inputs_BS, targets_BS) in enumerate(batches):
                activity.set_phase(f"forward micro-batch {i}")
                loss = self._lm_loss(inputs_BS, targets_BS)
                activity.set_phase(f"backward micro-batch {i}")
                (loss * self.loss_scale).backward()
                loss_sum += loss.detach()
            local_loss, local_micro = float(self.pm.sum_loss_shares(loss_sum)), len(batches)
        else:
            activity.set_phase("pipeline schedule")
            local_loss, local_micro = self._pipeline_step(batches)
        activity.set_phase("gradient reduction")
        self.pm.finish_gradients()
        activity.set_phase("grad norm")
        grad_norm = self.pm.clip_grad_norm(t.grad_clip if t.grad_clip > 0 else math.inf)
        activity.set_phase("stats all-reduce")
        stats = self._step_stats(local_loss, local_micro)
        lr = self.optimizer.param_groups[0]["lr"]
        activity.set_phase("optimizer")
        if self.nonfinite.update_allowed(self.step + 1, stats, grad_norm, self._nonfinite_ranks):
            self.optimizer.step()
            self.scheduler.step()
            self.pm.update_expert_bias()
        else:  # skipped: the routers forget the loads they recorded for it
            self.pm.discard_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return stats, grad_norm, lr

    def _pipeline_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
        """Run the schedule over this rank's micro-batches; the loss lives on the last stage."""
        assert self.schedule is not None
        inputs = torch.cat([x for x, _ in batches])
        targets = torch.cat([y for _, y in batches])
        num_stages = self.ctx.dims.pp * len(self.pm.chunks)
        first, last = 0 in self.pm.stage_ids, num_stages - 1 in self.pm.stage_ids
        self._pp_losses.clear()
        args = (inputs,) if first else ()
        docs = self._documents(inputs)  # kwargs: torch's schedules hand them to every stage
        with self.autocast:
            self.schedule.step(*args, target=targets if last else None, **docs)
        if not last:
            return 0.0, 0
        total = self.pm.sum_loss_shares(torch.stack(self._pp_losses).double().sum())
        return float(total), len(self._pp_losses)

    def _pp_loss(self, logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        loss = self._cross_entropy(logits_BSV, targets_BS)
        self._pp_losses.append(loss.detach())
        return loss * self.loss_scale

    def _step_stats(self, loss_sum: float, micro_batches: int) -> dict[str, Any]:
        """The step's row fields: the loss and every callback's statistics, summed over
        pipeline stages and data-parallel ranks in one all-reduce, which also carries one
        non-finite flag per rank for the loss and for its gradient shards
        (``_nonfinite_ranks``: the lowest flagged rank of each, or None)."""
        world = self.ctx.dims.world_size
        flags = torch.zeros(2, world, dtype=torch.float64)
        flags[0, self.ctx.rank] = float(micro_batches > 0 and not math.isfinite(loss_sum))
        flags[1, self.ctx.rank] = float(not self.pm.local_grads_finite)
        sums = [torch.tensor([loss_sum, micro_batches], dtype=torch.float64), flags.flatten()]
        sums += [c.step_sums() for c in self.callbacks]
        flat = torch.cat(sums)
        if self.ctx.distributed:  # NCCL reduces device tensors only
            flat = self.ctx.reduce_over_stages_and_dp(flat.to(self.ctx.device)).cpu()
        parts = flat.split([s.numel() for s in sums])
        total_loss, total_micro = parts[0].tolist()
        flagged = [row.nonzero() for row in parts[1].view(2, world)]
        self._nonfinite_ranks = [int(f[0]) if f.numel() else None for f in flagged]
        row: dict[str, Any] = {"loss": total_loss / max(total_micro, 1)}
        for callback, part in zip(self.callbacks, parts[2:]):
            row.update(callback.step_fields(part, round(total_micro)))
        return row

    def _evaluate_and_log(
        self, step: int, writer: MetricsWriter | None, tracker: Tracker, bar: tqdm | None = None
    ) -> float:
        val = self.evaluate()
        row = {"step": step, "val_loss": val, "val_bpt": bits_per_token(val)}
        if writer is not None:
            writer.write(row)
            (bar.write if bar is not None else print)(
                f"step {step:>5} | val loss {val:.4f} | {row['val_bpt']:.3f} bits/token"
            )
        tracker.log(row, step)
        return val

    def _documents(self, inputs_BS: torch.Tensor) -> dict[str, torch.Tensor]:
        """The forward's document-masking kwargs (``data.document_mask``; none when off)."""
        d = self.cfg.data
        if not d.document_mask:
            return {}
        return document_inputs(inputs_BS, self.tokenizer.require_eos(), d.document_positions)

    def _local(self, t_BS: torch.Tensor) -> torch.Tensor:
        """A batch tensor on this rank's device, cut to its part of each sequence (cp)."""
        return self.pm.shard_sequences(t_BS.to(self.ctx.device))

    def _cross_entropy(self, logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        """This rank's share (``pm.loss_share`` x its tokens' mean) of the LM loss, in fp32."""
        loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())
        return loss * self.pm.loss_share

    def _lm_loss(self, inputs_BS: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        with self.autocast:  # _cross_entropy of the model's logits
            logits_BSV = self.model(inputs_BS, **self._documents(inputs_BS))
        return self._cross_entropy(logits_BSV, targets_BS)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss over ``train.eval_batches`` fixed validation micro-batches. Every
        data-parallel rank evaluates all of them (identical results; MoE all-to-alls need every
        rank of an EP group to run the same number of forwards); sums over pp and cp only."""
        t = self.cfg.train
        activity.set_phase("eval")
        for chunk in self.pm.chunks:
            chunk.eval()
        self.pm.start_step(self.step)
        total = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        batches = self.val_data.fixed_batches(t.eval_batches, t.micro_batch_size)
        for inputs_BS, targets_BS in batches:
            inputs_BS, targets_BS = self._local(inputs_BS), self._local(targets_BS)
            if self.schedule is None:
                total += self._lm_loss(inputs_BS, targets_BS)
                continue
            docs = self._documents(inputs_BS)
            with self.autocast:
                logits = pipeline_forward(self.pm, self.ctx, inputs_BS, **docs)
            if logits is not None:
                total += self._cross_entropy(logits, targets_BS)
        if self.schedule is not None:
            self.ctx.all_reduce(total, ("pp",))  # only the last stage's ranks hold the loss
        self.pm.sum_loss_shares(total)
        for chunk in self.pm.chunks:
            chunk.train()
        return float(total) / len(batches)

    def _log_row(
        self, step: int, stats: dict[str, Any], grad_norm: float, lr: float, tokens_per_s: float
    ) -> dict:
        """A logged row; ``tokens_per_s``: averaged since the previous row (``ThroughputWindow``).
        MFU divides by the peak measured on the logging rank (rows are written there)."""
        activity.set_phase("log row")
        world = self.ctx.dims.world_size
        row = {
            "step": step,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": model_flops_utilization(
                tokens_per_s, self.flops_per_token, self.peak_flops, world
            ),
        }
        row.update(stats)
        for callback in self.callbacks:
            row.update(callback.log_fields(self))
        return row
