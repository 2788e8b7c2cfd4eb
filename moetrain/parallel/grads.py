"""The global gradient norm (every parameter counted exactly once, whatever the layout) and
clipping by it.

Each rank adds the squares of its local gradient shards, divided by how many ranks hold an
identical copy of that shard; one all-reduce over the world then gives the norm of the full
gradient. A shard's copies: the ranks of its pipeline stage (world / pp) divided by the number
of distinct shards (the product of the mesh sizes it is sharded over). Examples: an expert
weight sharded over ep=2 and FSDP-sharded over edp=2 on a stage of 4 ranks has 4 distinct
shards, 1 copy each; a norm weight replicated over tp=2 with dp=1 has 2 copies, each counted
1/2. Getting this wrong is the classic EP bug (norms missing experts, or counting them ep
times): tests compare against the single-process norm.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Partial, Replicate

from moetrain.parallel.context import ParallelContext


def _local_and_shards(grad: Tensor) -> tuple[Tensor, int]:
    if not isinstance(grad, DTensor):
        return grad, 1
    shards = 1
    for dim, placement in enumerate(grad.placements):
        if isinstance(placement, Partial):
            raise RuntimeError("a gradient is still partial: reduce it before the norm")
        if not placement.is_replicate():  # Shard, or FSDP's _StridedShard over a TP shard
            shards *= grad.device_mesh.size(dim)
    return grad.to_local(), shards


def finish_partial_grads(params: list[nn.Parameter]) -> None:
    """Sum gradients DTensor left partial (a replicated weight used on sequence shards, as the
    norms under sequence parallelism) so each rank holds the full gradient."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(isinstance(pl, Partial) for pl in g.placements):
            placements = [Replicate() if isinstance(pl, Partial) else pl for pl in g.placements]
            p.grad = g.redistribute(placements=placements)


def local_grad_sumsq(params: list[nn.Parameter], ctx: ParallelContext) -> Tensor:
    """This rank's share of the squared global gradient norm (fp32 scalar): the squares of its
    local gradient shards, each divided by the number of ranks holding an identical copy."""
    stage_ranks = ctx.dims.world_size // ctx.dims.pp
    total = torch.zeros((), dtype=torch.float32, device=ctx.device)
    for p in params:
        if p.grad is None:
            continue
        local, shards = _local_and_shards(p.grad)
        copies = stage_ranks // shards
        total += local.float().pow(2).sum() / copies
    return total


def global_grad_norm(
    params: list[nn.Parameter], ctx: ParallelContext, local_sumsq: Tensor | None = None
) -> Tensor:
    """The L2 norm of the whole model's gradient (fp32 scalar, identical on every rank), from
    ``local_sumsq`` when given (:func:`local_grad_sumsq`)."""
    total = local_grad_sumsq(params, ctx) if local_sumsq is None else local_sumsq.clone()
    if ctx.distributed:
        dist.all_reduce(total)
    return total.sqrt()


def clip_grad_norm(
    params: list[nn.Parameter],
    max_norm: float,
    ctx: ParallelContext,
    local_sumsq: Tensor | None = None,
) -> float:
    """Scale the gradients so their global norm is at most ``max_norm`` (``inf``: no clipping,
    as ``torch.nn.utils.clip_grad_norm_``: coefficient ``max_norm / (norm + 1e-6)`` capped at 1).
    Returns the norm before clipping."""
    norm = global_grad_norm(params, ctx, local_sumsq)
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                local, _ = _local_and_shards(p.grad)
                local.mul_(coef.to(local.dtype))
    return float(norm)  # host sync: the norm is logged every step
