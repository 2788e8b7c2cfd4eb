"""A layout's plan in words: meshes, the rank table and what each rank holds (a dry run)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moetrain.parallel.dims import DENSE_AXES, EXPERT_AXES, LayoutError, ParallelDims
from moetrain.parallel.placement import ExpertPlacement, experts_share, placement_class

if TYPE_CHECKING:
    from moetrain.moe.config import MoEConfig
    from moetrain.parallel.memory_plan import MemoryPlan


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
    ranks: list[int] | None = None,
) -> str:
    """The plan for ``model`` (build it on the meta device: only shapes are read) under the
    expert ``placement`` (default: ``dims.expert_sharding`` with default options); the rank
    table lists ``ranks`` (default: every rank)."""
    placement = placement or placement_class(dims.expert_sharding)()
    num_layers = len(model.layers)  # type: ignore[arg-type]
    ranges = dims.layer_ranges(num_layers, virtual_stages)
    lines = [
        f"{dims.describe()}; experts: {placement.describe(dims)}",
        f"dense mesh {dict(zip(DENSE_AXES, dims.rank_grid().shape))}",
        f"expert mesh {dict(zip(EXPERT_AXES, dims.expert_grid().shape))}",
        "stages: " + ", ".join(f"{i}: layers {r.start}-{r.stop - 1}" for i, r in enumerate(ranges)),
        f"{'rank':>4} {'pp':>3} {'dp_r':>4} {'dp_s':>4} {'cp':>3} {'tp':>3} {'ep':>3} {'edp':>4} "
        f"{'etp':>3}  layers            experts      dense params  expert params",
    ]
    for rank in range(dims.world_size) if ranks is None else ranks:
        c = dims.coords(rank)
        mine = [r for i, r in enumerate(ranges) if i % dims.pp == c.pp]
        dense = expert = 0
        for r in mine:
            d, e = _stage_params(model, r)
            dense, expert = dense + d, expert + e
        # dense weights: split by tp, FSDP-sharded over dp_shard x cp; experts: as the placement
        dense_share = dense // (dims.tp * dims.dense_shard)
        experts, expert_share = "-", expert
        if num_experts:
            experts, expert_share = experts_share(dims, expert, c, num_experts)
        layer_text = ",".join(f"{r.start}-{r.stop - 1}" for r in mine)
        lines.append(
            f"{rank:>4} {c.pp:>3} {c.dp_replicate:>4} {c.dp_shard:>4} {c.cp:>3} {c.tp:>3} "
            f"{c.ep:>3} {c.edp:>4} {c.etp:>3}  {layer_text:<17} {experts:<12} {dense_share:>12,} "
            f"{expert_share:>14,}"
        )
    lines.append(
        "params per rank exclude embeddings and head; shares assume FSDP over dp_shard x cp "
        f"(dense); {placement.share_note()}"
    )
    if dims.cp > 1:
        lines.append(
            f"context parallel: each sequence split over {dims.cp} ranks, 2 load-balanced "
            f"chunks of seq_len/{2 * dims.cp} per rank; experts fold over dp_shard x cp x tp"
        )
    return "\n".join(lines)


def describe_memory(plan: MemoryPlan, gpu_memory_gb: float) -> str:
    """The memory plan as a table, one row per rank class: GB (10**9 bytes), or MB (10**6)
    when every class needs less than 1 GB."""
    from moetrain.parallel.memory_plan import GB, gb_text

    worst = plan.largest_class
    unit, scale = ("GB", GB) if worst.total >= GB else ("MB", GB / 1000)
    s = plan.settings
    schedule = f"{s['pp_schedule']}, " if s["pp_schedule"] else ""
    ckpt = "on" if s["activation_checkpointing"] else "off"
    lines = [
        f"memory per GPU in {unit}: micro-batch {s['micro_batch_size']} x seq_len "
        f"{s['seq_len']}, {s['dtype']}, {s['optimizer']}, {schedule}"
        f"{s['micro_batches_per_dp_rank']} micro-batches per data-parallel rank, activation "
        f"checkpointing {ckpt} (act: the one the total uses)",
        "rank classes: one per pipeline rank; its ranks differ only in data-parallel, CP, EP, TP "
        "and ETP position and hold equal shapes; planned on its first rank (data-parallel position "
        "0: FSDP's largest shard)",
        f"{'class':<6} {'ranks':<11} {'params':>7} {'grads':>7} {'optim':>7} {'act':>7} "
        f"{'act_ckpt':>8} {'act_full':>8} {'flight':>6} {'a2a':>6} {'fsdp':>6} {'other':>6} "
        f"{'total':>7}",
    ]
    for c in plan.classes:
        items = {k: v / scale for k, v in c.items().items()}
        other = items["buffers"] + items["FSSDP experts"]
        ranks = f"{c.ranks[0]}-{c.ranks[-1]}" if len(c.ranks) > 1 else str(c.ranks[0])
        a = c.activations
        lines.append(
            f"{c.name:<6} {ranks:<11} {items['parameters']:>7.2f} {items['gradients']:>7.2f} "
            f"{items['optimizer state']:>7.2f} {items['activations']:>7.2f} "
            f"{a.checkpointed / scale:>8.2f} {a.full / scale:>8.2f} {max(a.in_flight):>6} "
            f"{items['all-to-all buffers']:>6.2f} {items['FSDP buffers']:>6.2f} {other:>6.2f} "
            f"{c.total / scale:>7.2f}"
        )
    verdict = "fits" if worst.total / GB <= gpu_memory_gb else "does NOT fit"
    lines += [
        f"largest: rank class {worst.name}, {gb_text(worst.total)} GB per GPU: {verdict} in "
        f"{gpu_memory_gb:g} GB",
        f"planned {len(plan.classes)} rank class(es) on the meta device in {plan.wall_s:.1f} s; "
        f"peak RSS {plan.peak_rss_mb:.0f} MB; every parameter stayed on meta",
    ]
    return "\n".join(lines)


def describe_node_traffic(
    moe: MoEConfig, dims: ParallelDims, a2a: str, ranks_per_node: int | None, tokens: int
) -> str | None:
    """One line on the inter-node token traffic of one MoE layer call for a rank's micro-batch
    of ``tokens`` tokens, per exchange (dispatch, combine and their gradients), at fp32: the
    bound node-limited routing gives with the node-deduplicating exchange, or the
    per-assignment rows of the others. None when there is nothing to say."""
    from moetrain.moe.node_routing import node_limit_bound

    M, G = moe.max_node_groups, moe.num_node_groups
    limit = "" if M is None else f"node-limited routing: <= {M} of {G} node groups per token; "
    if dims.ep == 1 or not ranks_per_node:
        if M is None:
            return None
        return f"{limit}no expert parallelism across nodes here: no inter-node token rows"
    try:
        nodes, _ = dims.ep_node_layout(ranks_per_node)
    except LayoutError:  # EP groups not split evenly over nodes (a flat exchange still runs)
        return f"{limit}EP groups are not split evenly over nodes: no per-node bound" if M else None
    if nodes == 1:
        return f"{limit}one node per EP group: no inter-node token rows" if M else None
    if a2a == "node_dedup":
        per_token, width = node_limit_bound(moe, nodes), moe.dim + 2 * moe.num_experts
        how = f"node_dedup: <= {per_token} row(s) of {width} values per token"
    else:
        per_token, width = moe.top_k, moe.dim
        how = f"{a2a}: up to top_k={per_token} rows of {width} values per token (one per expert)"
        if M is not None:
            how += "; parallel.ep_a2a=node_dedup would bound it by the node groups"
    mib = tokens * per_token * width * 4 / 2**20
    return (
        f"{limit}inter-node rows per MoE layer call over {nodes} nodes per EP group: {how}; "
        f"<= {mib:.2f} MiB per exchange for {tokens} tokens per rank (fp32)"
    )
