"""A layout's memory per GPU without a cluster: the real parallelize code on the meta device.

:func:`plan_memory` starts torch's fake process group at the layout's world size in this one
process, once per **rank class**, builds the meshes, builds the model on the meta device and
runs :func:`moetrain.parallel.parallelize.parallelize` exactly as the trainer does (pipeline
stages, TP, the expert placement, FSDP2) — then reads every local shard's shape (``to_local()``
of each DTensor) instead of allocating it. Nothing weight-sized is ever allocated: every
parameter and buffer must still be on the meta device afterwards (checked).

Rank classes: ranks with the same pipeline rank hold the same shapes. Their other coordinates
only pick *which* slice they hold: EP, TP and ETP slices are equal because validation requires
the split dims to divide, and FSDP2 gives data-parallel position 0 the largest (ceil) shard. So
each pipeline rank is one class, planned on its first rank (every other coordinate 0).

Per class: parameter, gradient, optimizer-state and buffer bytes by dtype (the local shards;
gradients as their parameters, AdamW ``exp_avg`` and ``exp_avg_sq`` like the parameter plus a
scalar fp32 ``step`` per parameter, SGD one momentum buffer when ``optim.momentum > 0``), the
activation estimate (:mod:`moetrain.parallel.activation_memory`), the EP all-to-all buffers,
FSDP's all-gathered working set and FSSDP's materialized experts.
"""

from __future__ import annotations

import copy
import math
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config.schema import Config
from moetrain.config.validate import expert_placement, parallel_dims
from moetrain.models.transformer import Transformer
from moetrain.parallel import activation_memory as act
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.dims import ParallelDims, build_meshes
from moetrain.parallel.parallelize import ParallelModel, parallelize
from moetrain.parallel.shard_memory import (
    fsdp_buffers,
    local_tensor,
    state_bytes,
    weight_cast_bytes,
)

GB = 1e9
ITEMS = (
    "parameters",
    "gradients",
    "optimizer state",
    "buffers",
    "activations",
    "all-to-all buffers",
    "FSDP buffers",
    "FSSDP experts",
)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (10**6 bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


@dataclass
class RankClass:
    """One rank class: its pipeline rank, its ranks, the rank planned (``representative``) and
    every memory item in bytes (the state items by dtype name)."""

    name: str
    pp_rank: int
    ranks: list[int]
    representative: int
    parameters: dict[str, int]
    gradients: dict[str, int]
    optimizer: dict[str, int]
    buffers: dict[str, int]
    activations: act.ActivationEstimate
    checkpointing: bool
    all_to_all: int = 0
    fsdp_buffers: int = 0
    fssdp_experts: int = 0

    def items(self) -> dict[str, int]:
        """Every item in bytes; ``activations`` as the configured checkpointing setting has it."""
        a = self.activations
        return dict(
            zip(
                ITEMS,
                (
                    sum(self.parameters.values()),
                    sum(self.gradients.values()),
                    sum(self.optimizer.values()),
                    sum(self.buffers.values()),
                    a.checkpointed if self.checkpointing else a.full,
                    self.all_to_all,
                    self.fsdp_buffers,
                    self.fssdp_experts,
                ),
            )
        )

    @property
    def total(self) -> int:
        return sum(self.items().values())

    def largest(self) -> tuple[str, int]:
        return max(self.items().items(), key=lambda kv: kv[1])

    def to_json(self) -> dict[str, Any]:
        a = self.activations
        return {
            "class": self.name,
            "pp_rank": self.pp_rank,
            "ranks": self.ranks,
            "representative_rank": self.representative,
            "bytes": {
                "parameters": self.parameters,
                "gradients": self.gradients,
                "optimizer_state": self.optimizer,
                "buffers": self.buffers,
            },
            "activations": {
                "per_micro_batch": a.per_micro_batch,
                "per_micro_batch_checkpointed": a.per_micro_batch_checkpointed,
                "in_flight": a.in_flight,
                "total": a.full,
                "total_checkpointed": a.checkpointed,
                "activation_checkpointing": self.checkpointing,
            },
            "all_to_all_buffer": self.all_to_all,
            "fsdp_buffers": self.fsdp_buffers,
            "fssdp_experts": self.fssdp_experts,
            "items": self.items(),
            "total_bytes": self.total,
            "total_gb": round(self.total / GB, 3),
            "largest_item": self.largest()[0],
        }


@dataclass
class MemoryPlan:
    """Every rank class of a layout, the settings the estimate assumed, and what planning cost
    (``wall_s``, ``peak_rss_mb``)."""

    dims: ParallelDims
    layout: dict[str, Any]
    settings: dict[str, Any]
    classes: list[RankClass]
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    on_meta: bool = True  # planning raises otherwise

    @property
    def largest_class(self) -> RankClass:
        return max(self.classes, key=lambda c: c.total)

    def to_json(self, gpu_memory_gb: float) -> dict[str, Any]:
        worst = self.largest_class.total / GB
        return {
            "world_size": self.dims.world_size,
            "layout": self.layout,
            "settings": self.settings,
            "rank_classes": "one per pipeline rank, planned on its first rank",
            "per_rank": [c.to_json() for c in self.classes],
            "max_rank_total_gb": round(worst, 3),
            "gpu_memory_gb": gpu_memory_gb,
            "fits": worst <= gpu_memory_gb,
            "all_parameters_on_meta": self.on_meta,
            "wall_s": round(self.wall_s, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }


@contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    """torch's fake process group as the default group (collectives return at once, nothing is
    sent): every mesh and sharding decision of ``rank`` in a world of ``world_size``."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError(
            "plan_memory starts its own fake process group: call it where no default process "
            "group exists (e.g. tools/plan_parallel.py, not inside a launch)"
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _settings(cfg: Config, dims: ParallelDims) -> dict[str, Any]:
    t, p = cfg.train, cfg.parallel
    n_micro = t.global_batch_size // (t.micro_batch_size * dims.dp)
    return {
        "micro_batch_size": t.micro_batch_size,
        "seq_len": t.seq_len,
        "global_batch_size": t.global_batch_size,
        "micro_batches_per_dp_rank": n_micro,
        "dtype": t.dtype,
        "optimizer": cfg.optim.name,
        "pp_schedule": p.pp_schedule if dims.pp > 1 else None,
        "pp_virtual_stages": p.pp_virtual_stages,
        "activation_checkpointing": p.activation_checkpointing,
        "expert_sharding": p.expert_sharding,
    }


def _activation_layout(cfg: Config, dims: ParallelDims) -> act.ActivationLayout:
    fssdp = cfg.parallel.expert_sharding == "fssdp" and dims.stage_ranks > 1
    return act.ActivationLayout(
        micro_batch=cfg.train.micro_batch_size,
        seq_len=cfg.train.seq_len,
        bf16=cfg.train.dtype == "bf16",
        tp=dims.tp,
        etp=dims.etp,
        ep=dims.ep,
        fssdp_slack=cfg.parallel.fssdp_slack if fssdp else None,
        cp=dims.cp,
    )


def _fssdp_experts(cfg: Config, dims: ParallelDims) -> int | None:
    """Experts a rank materializes per MoE call under FSSDP (balanced routing), else None."""
    if cfg.parallel.expert_sharding != "fssdp" or dims.stage_ranks == 1:
        return None
    return math.ceil(cfg.model.moe.num_experts / dims.stage_ranks)


def _exchange_bytes(
    cfg: Config, dims: ParallelDims, pm: ParallelModel, lay: act.ActivationLayout, flight: int
) -> tuple[int, int]:
    """(all-to-all buffers, FSSDP materialized experts) in bytes for this rank."""
    moe_layers = len(pm.moe_layers)
    if not moe_layers:
        return 0, 0
    m = cfg.model
    sent, computed = act.routed_rows(m, lay)
    a2a = 0
    if dims.ep > 1 or _fssdp_experts(cfg, dims) is not None:
        # one MoE layer's dispatch: rows out and rows in, fp32 (the norm's output)
        a2a = (sent + computed) * m.dim * act.FP32
        if dims.ep > 1 and cfg.parallel.ep_a2a == "hierarchical":
            a2a *= 2  # the inter-node stage's buffers, then the intra-node ones
    held = _fssdp_experts(cfg, dims)
    if held is None:
        return a2a, 0
    moe = m.moe
    per_expert = (3 if moe.activation == "swiglu" else 2) * moe.hidden_dim * m.dim * act.FP32
    layer = held * per_expert
    if cfg.parallel.fssdp_rematerialize:
        return a2a, 2 * layer  # one layer's gathered weights and their full gradients
    return a2a, layer * moe_layers * flight + layer


def _plan_rank_class(
    cfg: Config, dims: ParallelDims, pp_rank: int, meta_model: Transformer
) -> RankClass:
    rank = pp_rank * dims.stage_ranks
    p = cfg.parallel
    with fake_process_group(rank, dims.world_size):
        ctx = ParallelContext(dims, rank, torch.device("cpu"), build_meshes(dims, "cpu"))
        model = copy.deepcopy(meta_model)  # parallelize cuts and replaces modules in place
        pm = parallelize(
            model, ctx, p.activation_checkpointing, p.pp_virtual_stages, expert_placement(cfg)
        )
        off_meta = [
            n for c in pm.chunks for n, t in [*c.named_parameters(), *c.named_buffers()]
            if local_tensor(t).device.type != "meta"
        ]  # fmt: skip
        if off_meta:
            raise RuntimeError(f"plan_memory allocated real tensors: {off_meta[:3]}")
        state = state_bytes(pm, cfg)
        lay = _activation_layout(cfg, dims)
        fssdp = _fssdp_experts(cfg, dims)
        chunks = _chunk_activations(cfg, dims, pm, fssdp)
        settings = _settings(cfg, dims)
        flight = act.in_flight(
            p.pp_schedule, dims.pp, pp_rank, settings["micro_batches_per_dp_rank"],
            p.pp_virtual_stages,
        )  # fmt: skip
        estimate = act.estimate(cfg.model, lay, chunks, flight)
        a2a, fssdp_bytes = _exchange_bytes(cfg, dims, pm, lay, max(flight))
        return RankClass(
            name=f"pp{pp_rank}",
            pp_rank=pp_rank,
            ranks=list(range(rank, rank + dims.stage_ranks)),
            representative=rank,
            parameters=state["parameters"],
            gradients=state["gradients"],
            optimizer=state["optimizer"],
            buffers=state["buffers"],
            activations=estimate,
            checkpointing=p.activation_checkpointing,
            all_to_all=a2a,
            fsdp_buffers=fsdp_buffers(pm),
            fssdp_experts=fssdp_bytes,
        )


def _chunk_activations(
    cfg: Config, dims: ParallelDims, pm: ParallelModel, fssdp: int | None
) -> list[act.ChunkActivations]:
    num_layers = cfg.model.num_layers
    ranges = dims.layer_ranges(num_layers, cfg.parallel.pp_virtual_stages)
    bf16 = cfg.train.dtype == "bf16"
    out = []
    for chunk, s in zip(pm.chunks, pm.stage_ids):
        layers = cast(nn.Module, chunk.layers)
        blocks = dict(layers.items()) if isinstance(layers, nn.ModuleDict) else None
        casts: dict[int, int] = {}
        if bf16:
            for i in ranges[s]:
                block = blocks[str(i)] if blocks is not None else layers[i]  # type: ignore[index]
                casts[i] = weight_cast_bytes(block, fssdp)
        out.append(act.ChunkActivations(ranges[s], s == len(ranges) - 1, casts))
    return out


def plan_memory(cfg: Config, world_size: int) -> MemoryPlan:
    """Plan ``cfg`` (validated, e.g. by ``moetrain.config.validate.validate``) at
    ``world_size`` ranks: one :class:`RankClass` per pipeline rank. Runs in a process without a
    default process group (it starts and destroys a fake one per class)."""
    start = time.perf_counter()
    dims = parallel_dims(cfg, world_size)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = Transformer(cfg.model)  # draws its init seed: leave the caller's RNG alone
    classes = [_plan_rank_class(cfg, dims, p, model) for p in range(dims.pp)]
    return MemoryPlan(
        dims=dims,
        layout=dims.layout(cfg.parallel.pp_virtual_stages),
        settings=_settings(cfg, dims),
        classes=classes,
        wall_s=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
    )


def over_budget(plan: MemoryPlan, gpu_memory_gb: float) -> str | None:
    """One line naming the largest rank class, its largest item and a fix when the plan needs
    more than ``gpu_memory_gb`` per GPU; None when it fits."""
    worst = plan.largest_class
    if worst.total / GB <= gpu_memory_gb:
        return None
    item, size = worst.largest()
    return (
        f"rank class {worst.name} needs {gb_text(worst.total)} GB > {gpu_memory_gb:g} GB; "
        f"largest: {item} {gb_text(size)} GB; {_hint(item, worst.checkpointing)}"
    )


def gb_text(n_bytes: int) -> str:
    """GB with one decimal, or three significant digits below 1 GB."""
    gb = n_bytes / GB
    return f"{gb:.1f}" if gb >= 1 else f"{gb:.3g}"


def _hint(item: str, checkpointing: bool) -> str:
    if item == "activations" and not checkpointing:
        return (
            "set parallel.activation_checkpointing=true or lower train.micro_batch_size / "
            "train.seq_len"
        )
    if item in ("activations", "all-to-all buffers"):
        return "lower train.micro_batch_size or train.seq_len, or add parallel.pp / parallel.tp"
    if item == "FSDP buffers":
        return "split the layers further: raise parallel.tp, parallel.ep or parallel.pp"
    if item == "FSSDP experts":
        return "set parallel.fssdp_rematerialize=true or use more ranks per stage"
    return (
        "shard further: more GPUs (parallel.dp_shard), a larger parallel.ep or parallel.pp; "
        "or pass --gpu-memory-gb for larger GPUs"
    )
