"""A layout's plan in words: meshes, the rank table and what each rank holds (a dry run)."""

from __future__ import annotations

import torch

from moetrain.parallel.dims import DENSE_AXES, EXPERT_AXES, ParallelDims
from moetrain.parallel.placement import ExpertPlacement, experts_share, placement_class


def _stage_params(model: torch.nn.Module, layers: range) -> tuple[int, int]:
    """(dense, routed-expert) parameter counts of the given decoder layers."""
    dense = expert = 0
    for i in layers:
        for name, p in model.layers[i].named_parameters():  # type: ignore[index,union-attr]
            if ".experts." in f".{name}":
                expert += p.numel()
            else:
                dense += p.numel()
    return dense, expert


def describe_plan(
    dims: ParallelDims,
    model: torch.nn.Module,
    num_experts: int | None,
    virtual_stages: int = 1,
    placement: ExpertPlacement | None = None,
) -> str:
    """The plan for ``model`` (build it on the meta device: only shapes are read) under the
    expert ``placement`` (default: ``dims.expert_sharding`` with default options)."""
    placement = placement or placement_class(dims.expert_sharding)()
    num_layers = len(model.layers)  # type: ignore[arg-type]
    ranges = dims.layer_ranges(num_layers, virtual_stages)
    lines = [
        f"{dims.describe()}; experts: {placement.describe(dims)}",
        f"dense mesh {dict(zip(DENSE_AXES, dims.rank_grid().shape))}",
        f"expert mesh {dict(zip(EXPERT_AXES, dims.expert_grid().shape))}",
        "stages: " + ", ".join(f"{i}: layers {r.start}-{r.stop - 1}" for i, r in enumerate(ranges)),
        f"{'rank':>4} {'pp':>3} {'dp_r':>4} {'dp_s':>4} {'tp':>3} {'ep':>3} {'edp':>4} "
        f"{'etp':>3}  layers            experts      dense params  expert params",
    ]
    for rank in range(dims.world_size):
        c = dims.coords(rank)
        mine = [r for i, r in enumerate(ranges) if i % dims.pp == c.pp]
        dense = expert = 0
        for r in mine:
            d, e = _stage_params(model, r)
            dense, expert = dense + d, expert + e
        # dense weights: split by tp, FSDP-sharded over dp_shard; experts: as the placement holds
        dense_share = dense // (dims.tp * dims.dp_shard)
        experts, expert_share = "-", expert
        if num_experts:
            experts, expert_share = experts_share(dims, expert, c, num_experts)
        layer_text = ",".join(f"{r.start}-{r.stop - 1}" for r in mine)
        lines.append(
            f"{rank:>4} {c.pp:>3} {c.dp_replicate:>4} {c.dp_shard:>4} {c.tp:>3} {c.ep:>3} "
            f"{c.edp:>4} {c.etp:>3}  {layer_text:<17} {experts:<12} {dense_share:>12,} "
            f"{expert_share:>14,}"
        )
    lines.append(
        "params per rank exclude embeddings and head; shares assume FSDP over dp_shard "
        f"(dense); {placement.share_note()}"
    )
    return "\n".join(lines)
