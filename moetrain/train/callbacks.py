"""Trainer callbacks: what a run collects and writes besides the loss, outside the loop.

The loop calls every callback at fixed points (``pre_train``, ``post_step``, ``post_train``) and
asks each for its step statistics: ``step_sums()`` is a float64 vector of a fixed length that
adds up over ranks (every rank returns one, zeros for what it does not hold), and
``step_fields(totals, micro_batches)`` turns the sum over pipeline stages and data-parallel
ranks into ``metrics.jsonl`` fields. The trainer concatenates every callback's vector with its
own loss sums and reduces them in one all-reduce per step.

Expert placements contribute their statistics the same way (``ExpertPlacement.step_statistics``
returns objects with ``step_sums``/``step_fields``), so the loop names no placement.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from moetrain.models.config import ModelConfig
from moetrain.moe import MoELayer
from moetrain.parallel import activity
from moetrain.parallel.placement import StepStatistics
from moetrain.report import build_report
from moetrain.train.memory import peak_memory
from moetrain.train.metrics import StepStats
from moetrain.train.tracking import Tracker

if TYPE_CHECKING:
    from moetrain.train.trainer import Trainer


class Callback:
    """A trainer hook; every method is optional (the defaults do nothing and log nothing)."""

    def pre_train(self, trainer: Trainer) -> None:
        """Before the first step of ``run`` (after a resume)."""

    def pre_step(self, trainer: Trainer, step: int) -> None:
        """Right before optimizer step ``step`` starts."""

    def post_step(self, trainer: Trainer, step: int, row: dict[str, Any] | None) -> None:
        """After optimizer step ``step``; ``row`` is the logged row on log steps, else None."""

    def post_train(self, trainer: Trainer, tracker: Tracker) -> None:
        """After the last step (every rank)."""

    def log_fields(self, trainer: Trainer) -> dict[str, Any]:
        """Fields for a logged row, asked on every rank at each log step (collectives
        allowed: every rank calls it at the same point)."""
        return {}

    def step_sums(self) -> Tensor:
        """This step's additive statistics on this rank (drained); empty by default."""
        return torch.zeros(0, dtype=torch.float64)

    def step_fields(self, totals: Tensor, micro_batches: int) -> dict[str, Any]:
        """Row fields from the sums over ranks of ``step_sums``; ``micro_batches`` is the
        step's micro-batch count over all data-parallel ranks."""
        return {}


class PlacementStatistics(Callback):
    """Adapts an expert placement's statistics source to the trainer's hooks."""

    def __init__(self, source: StepStatistics) -> None:
        self.source = source

    def step_sums(self) -> Tensor:
        return self.source.step_sums()

    def step_fields(self, totals: Tensor, micro_batches: int) -> dict[str, Any]:
        return self.source.step_fields(totals)


class MoEStatistics(Callback):
    """Routing statistics of every MoE layer (aux and z-loss, loads, drops, router entropy):
    each layer logs every training call (``MoELayer.stats_log``); each step drains the logs of
    this rank's layers (``moe_ids``: their global MoE indices)."""

    def __init__(
        self, moe_layers: list[MoELayer], moe_ids: list[int], model: ModelConfig, seq_len: int
    ) -> None:
        self.layers = list(zip(moe_layers, moe_ids))
        # sizes from the model, so a rank without MoE layers sends a vector of the same length
        self.num_layers, self.num_experts = model.num_moe_layers, model.moe.num_experts
        self.seq_len = seq_len
        for layer in moe_layers:
            layer.stats_log = []

    def step_sums(self) -> Tensor:
        stats = StepStats()
        for layer, index in self.layers:
            assert layer.stats_log is not None
            for s in layer.stats_log:
                stats.add_layer_stats(index, s)
            layer.stats_log.clear()
        return stats.to_vector(self.num_layers, self.num_experts, self.seq_len)

    def step_fields(self, totals: Tensor, micro_batches: int) -> dict[str, Any]:
        stats = StepStats.from_vector(totals, self.num_layers, self.num_experts, self.seq_len)
        return stats.moe_fields(micro_batches)


class MemoryStatistics(Callback):
    """Peak memory (``mem/peak_rss_gb``, ``mem/peak_rss_rank``; on CUDA ``mem/peak_allocated_gb``,
    ``mem/peak_reserved_gb``): the largest over the launch's ranks, on every logged row."""

    def log_fields(self, trainer: Trainer) -> dict[str, Any]:
        return peak_memory(trainer.ctx)


class RunReport(Callback):
    """At the end of the run (logging rank): ``report.html`` and ``expert_load.png`` in the run
    dir, built from the whole ``metrics.jsonl`` (every process of the run, across resumes: see
    ``moetrain.report``); the expert-load figure also goes to wandb. ``python -m
    moetrain.report <run dir>`` rebuilds them."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.run_dir, self.enabled = run_dir, enabled

    def post_train(self, trainer: Trainer, tracker: Tracker) -> None:
        if not self.enabled:
            return
        report = build_report(self.run_dir)
        if report.expert_load is not None:
            tracker.log_image("expert_load_heatmap", report.expert_load, trainer.cfg.train.steps)


def straggler_fields(table: Tensor) -> dict[str, Any]:
    """The ``straggler/*`` fields from a ``world x 2`` table (rank r's row: its step seconds,
    its MoE exchange wait seconds): min, max and argmax over ranks of each, and the argmin of
    the wait (the rank the others waited for). Ties go to the lowest rank."""
    fields: dict[str, Any] = {}
    for col, name in enumerate(("step_s", "a2a_wait_s")):
        values = table[:, col]
        fields[f"straggler/{name}_min"] = float(values.min())
        fields[f"straggler/{name}_max"] = float(values.max())
        fields[f"straggler/{name}_argmax"] = int(values.argmax())
    fields["straggler/a2a_wait_s_argmin"] = int(table[:, 1].argmin())
    return fields


class StragglerStatistics(Callback):
    """Per logged step, over the launch's ranks: each rank's step time (``pre_step`` to its
    log row) and the wall time it spent waiting in MoE exchanges during the step (EP
    all-to-alls, FSSDP's gathers, reduces and count all-gather: ``activity.take_comm_wait_s``).
    One ``MAX`` all-reduce of a ``world x 2`` float64 table (each rank fills its row; the
    values are >= 0, so the result is every rank's row) gives ``straggler/step_s_{min,max,
    argmax}`` and ``straggler/a2a_wait_s_{min,max,argmax,argmin}``.

    Reading them: ranks synchronize in every collective, so a slow rank shows less as a longer
    step than as the others' waiting: ``a2a_wait_s_argmin`` names the rank the others waited
    for, ``a2a_wait_s_max - a2a_wait_s_min`` what it cost them; ``step_s_argmax`` names the
    rank slowest at the work after the step's last collective. Needs the trainer to call
    ``pre_step`` before each step."""

    def __init__(self) -> None:
        self.start: float | None = None

    def pre_step(self, trainer: Trainer, step: int) -> None:
        """Start the step's clock; waits before it (eval, checkpoints) are not the step's."""
        self.start = time.perf_counter()
        activity.take_comm_wait_s()

    def log_fields(self, trainer: Trainer) -> dict[str, Any]:
        step_s = time.perf_counter() - self.start if self.start is not None else 0.0
        ctx = trainer.ctx
        table = torch.zeros(ctx.dims.world_size, 2, dtype=torch.float64)
        table[ctx.rank, 0] = step_s
        table[ctx.rank, 1] = activity.take_comm_wait_s()
        if ctx.distributed:
            table = table.to(ctx.device)  # NCCL reduces device tensors only
            dist.all_reduce(table, op=dist.ReduceOp.MAX)
            table = table.cpu()
        return straggler_fields(table)
