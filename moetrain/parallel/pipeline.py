"""Pipeline parallelism: ``torch.distributed.pipelining`` stages over this rank's chunks and the
training schedule (GPipe, 1F1B, interleaved 1F1B), plus a forward-only pass for evaluation.

Stage ``s`` runs on pp rank ``s % pp`` (``v * pp + p`` for virtual stage ``v``): the layout
interleaved schedules expect. Document masking's ``documents_BS``/``positions_BS`` go to
``schedule.step`` as keyword arguments: torch's schedules split tensor kwargs into micro-batches
like the inputs and hand them to every stage's forward (``forward_one_chunk``), not only the
first; they take no gradient and are never sent between stages. The pipeline's micro-batches
are the rank's ``global / (micro x dp)`` micro-batches, so every MoE call sees exactly one
micro-batch, as in the single-process run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.distributed.pipelining.stage import _PipelineStageBase

from moetrain.parallel.context import ParallelContext
from moetrain.parallel.parallelize import ParallelModel

SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")


def schedule_error(schedule: str, pp: int, virtual_stages: int, n_micro: int) -> str | None:
    """Why ``schedule`` cannot run ``n_micro`` micro-batches on this layout (None if it can);
    the same conditions torch's schedules check, as a config-time message."""
    if schedule not in SCHEDULES:
        return f"parallel.pp_schedule: must be one of {', '.join(SCHEDULES)}, got {schedule!r}"
    if schedule == "interleaved_1f1b":
        if virtual_stages < 2:
            return (
                "parallel.pp_virtual_stages: interleaved_1f1b needs >= 2 virtual stages per "
                f"rank, got {virtual_stages}; set it to 2 or use pp_schedule=1f1b"
            )
        rounds = max(1, n_micro // pp)
        if n_micro % rounds:
            return (
                f"train.global_batch_size: interleaved_1f1b needs the micro-batches per rank "
                f"({n_micro}) to be a multiple of {rounds}; use a multiple of pp={pp}"
            )
    elif virtual_stages != 1:
        return (
            f"parallel.pp_virtual_stages: {virtual_stages} needs pp_schedule=interleaved_1f1b "
            f"({schedule} runs one stage per rank)"
        )
    if schedule == "1f1b" and n_micro < pp:
        return (
            f"train.global_batch_size: 1f1b needs at least pp={pp} micro-batches per "
            f"data-parallel rank, got {n_micro} (= global / (micro x dp)); raise "
            "train.global_batch_size or lower train.micro_batch_size"
        )
    return None


def build_schedule(
    pm: ParallelModel,
    ctx: ParallelContext,
    schedule: str,
    n_micro: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    micro_batch: int,
    seq_len: int,
):
    num_stages = ctx.dims.pp * len(pm.chunks)
    group = ctx.group("pp")
    # static shapes: torch's runtime shape inference would run an extra forward of the first
    # micro-batch (and record MoE statistics and a loss for it)
    stages: list[_PipelineStageBase] = [
        PipelineStage(
            chunk,
            s,
            num_stages,
            ctx.device,
            input_args=_stage_tensor(pm, ctx, s == 0, micro_batch, seq_len, logits=False),
            output_args=_stage_tensor(
                pm, ctx, False, micro_batch, seq_len, logits=s == num_stages - 1
            ),
            group=group,
        )
        for chunk, s in zip(pm.chunks, pm.stage_ids)
    ]
    # scale_grads=False: the loss function already scales by the global micro-batch count
    if schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(list(stages), n_micro, loss_fn=loss_fn, scale_grads=False)
    cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
    return cls(stages[0], n_micro, loss_fn=loss_fn, scale_grads=False)


@torch.no_grad()
def pipeline_forward(
    pm: ParallelModel, ctx: ParallelContext, tokens_BS: Tensor, **documents: Tensor
) -> Tensor | None:
    """Forward-only pass through all stages (evaluation): activations travel by send/recv in
    stage order. ``documents`` (``documents_BS``, ``positions_BS``: document masking) reach
    every stage, as in the training schedule. Returns the logits on the rank holding the last
    stage, None elsewhere."""
    pp = ctx.dims.pp
    num_stages = pp * len(pm.chunks)
    group = ctx.group("pp")
    my_pp = ctx.coords.pp
    h: Tensor | None = None
    for s in range(num_stages):
        owner = s % pp
        if owner != my_pp:
            continue
        chunk = pm.chunks[pm.stage_ids.index(s)]
        if s == 0:
            h = chunk(tokens_BS, **documents)
        else:
            B, S = tokens_BS.shape
            h = torch.empty(_hidden_shape(pm, ctx, B, S), device=ctx.device)
            dist.recv(h, group=group, group_src=(s - 1) % pp)
            h = chunk(h, **documents)
        if s < num_stages - 1:
            assert h is not None
            dist.send(h.contiguous(), group=group, group_dst=(s + 1) % pp)
    return h if (num_stages - 1) % pp == my_pp else None


def _stage_tensor(
    pm: ParallelModel, ctx: ParallelContext, tokens: bool, batch: int, seq_len: int, logits: bool
) -> Tensor:
    """A meta tensor with the shape and dtype of a stage's input or output."""
    cfg = pm.cfg
    if tokens:
        return torch.empty(batch, seq_len, dtype=torch.long, device="meta")
    shape = (batch, seq_len, cfg.vocab_size) if logits else _hidden_shape(pm, ctx, batch, seq_len)
    return torch.empty(shape, device="meta", requires_grad=True)  # activations carry gradients


def _hidden_shape(pm: ParallelModel, ctx: ParallelContext, batch: int, seq_len: int) -> tuple:
    """Hidden states between stages: this rank's sequence chunk under TP."""
    return (batch, seq_len // ctx.dims.tp, pm.cfg.dim)
