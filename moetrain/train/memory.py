"""Peak memory per rank, reduced to the largest over the launch.

``mem/peak_rss_gb`` is the maximum over ranks of each process's peak resident set size so far
(``getrusage``'s ``ru_maxrss``: the high-water mark since the process started, imports
included), ``mem/peak_rss_rank`` the rank that holds it; on CUDA also ``mem/peak_allocated_gb`` and
``mem/peak_reserved_gb`` (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``, the
maximum over ranks). GB here is 10**9 bytes.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch
import torch.distributed as dist

from moetrain.parallel.context import ParallelContext

GB = 1e9


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def _local_peaks(device: torch.device) -> list[float]:
    peaks = [float(peak_rss_bytes())]
    if device.type == "cuda":
        peaks += [
            float(torch.cuda.max_memory_allocated(device)),
            float(torch.cuda.max_memory_reserved(device)),
        ]
    return peaks


def peak_memory(ctx: ParallelContext) -> dict[str, Any]:
    """The ``mem/*`` fields: each peak's maximum over every rank of the launch. Collective
    (every rank calls it at the same point); one all-reduce of ``world x kinds`` floats."""
    local = _local_peaks(ctx.device)
    world = ctx.dims.world_size
    table = torch.zeros(world, len(local), dtype=torch.float64)
    table[ctx.rank] = torch.tensor(local, dtype=torch.float64)
    if ctx.distributed:
        table = table.to(ctx.device)  # NCCL reduces device tensors only
        dist.all_reduce(table, op=dist.ReduceOp.MAX)
        table = table.cpu()
    rss = table[:, 0]
    fields: dict[str, Any] = {
        "mem/peak_rss_gb": float(rss.max()) / GB,
        "mem/peak_rss_rank": int(rss.argmax()),
    }
    if table.shape[1] > 1:
        fields["mem/peak_allocated_gb"] = float(table[:, 1].max()) / GB
        fields["mem/peak_reserved_gb"] = float(table[:, 2].max()) / GB
    return fields
