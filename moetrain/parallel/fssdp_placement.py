"""FSSDP as a placement (``parallel.expert_sharding=fssdp``).

Every routed expert is sharded on F over all ranks of a pipeline stage (the FSSDP group,
``dp_replicate x dp_shard`` ranks, a mesh of its own: ``[pp, fssdp]``) and materialized sparsely
each call (:mod:`moetrain.parallel.fssdp`); it needs ``tp = ep = etp = 1``. Options:
``parallel.fssdp_rematerialize`` and ``parallel.fssdp_slack``.

Per-step statistics (``metrics.jsonl``), per MoE layer and averaged over the step's calls:
``fssdp_replicas`` (ranks that materialized each expert), ``fssdp_max_over_mean`` (the
placement's straggler factor: the busiest rank's rows over the mean) and ``fssdp_materialized``
((expert, rank) materializations per call).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from moetrain.models.config import ModelConfig
from moetrain.moe.layer import MoELayer
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.dims import LayoutError, ParallelDims, RankCoords
from moetrain.parallel.fssdp import FSSDPDispatcher, FSSDPOptions, apply_fssdp
from moetrain.parallel.fssdp_plan import DEFAULT_SLACK, PlanStats
from moetrain.parallel.placement import ExpertPlacement, StepStatistics

AXES = ("pp", "fssdp")


class FSSDPPlacement(ExpertPlacement):
    name = "fssdp"
    options: ClassVar[dict[str, Any]] = {
        "fssdp_rematerialize": True,
        "fssdp_slack": DEFAULT_SLACK,
    }
    shards_experts = True

    def fssdp_options(self) -> FSSDPOptions:
        return FSSDPOptions(self.values["fssdp_rematerialize"], self.values["fssdp_slack"])

    # --- layout level ---------------------------------------------------------------------------

    @classmethod
    def validate_dims(cls, dims: ParallelDims) -> None:
        for name in ("ep", "etp", "tp", "cp"):
            if getattr(dims, name) != 1:
                raise LayoutError(
                    f"parallel.expert_sharding: 'fssdp' shards every expert over all ranks of a "
                    f"pipeline stage and does not combine with parallel.{name}="
                    f"{getattr(dims, name)}; set parallel.{name}=1 or parallel.expert_sharding=ep"
                )

    @classmethod
    def validate_model(cls, dims: ParallelDims, model: ModelConfig) -> None:
        if model.num_moe_layers and model.moe.hidden_dim % dims.stage_ranks:
            raise LayoutError(
                f"parallel.expert_sharding: 'fssdp' splits each expert's hidden dim over the "
                f"{dims.stage_ranks} ranks of a pipeline stage, which do not divide "
                f"model.moe.hidden_dim={model.moe.hidden_dim}; pick a multiple of "
                f"{dims.stage_ranks}"
            )

    @classmethod
    def mesh(cls, dims: ParallelDims, device_type: str) -> DeviceMesh | None:
        """``[pp, fssdp]``: a stage's ranks in rank order along ``fssdp``."""
        grid = dims.rank_grid().view(dims.pp, dims.stage_ranks)
        return DeviceMesh(device_type, grid, mesh_dim_names=AXES)

    @classmethod
    def checkpoint_layout(cls, dims: ParallelDims) -> dict[str, Any]:
        return {"expert_sharding": cls.name}

    @classmethod
    def rank_experts(
        cls, dims: ParallelDims, coords: RankCoords, num_experts: int
    ) -> tuple[str, int]:
        # 1/N of each expert's F, materialized as routed
        return f"all, F/{dims.stage_ranks}", dims.stage_ranks

    @classmethod
    def share_note(cls) -> str:
        return "experts: their FSSDP shards"

    # --- options and run time -----------------------------------------------------------------

    def validate(self, dims: ParallelDims) -> None:
        slack = self.values["fssdp_slack"]
        if slack < 0:
            raise ValueError(f"parallel.fssdp_slack: must be >= 0, got {slack}")

    def describe(self, dims: ParallelDims) -> str:
        remat = "rematerialized" if self.values["fssdp_rematerialize"] else "kept for backward"
        return f"experts fssdp over {dims.stage_ranks} ranks per stage ({remat})"

    def apply(self, layer: MoELayer, ctx: ParallelContext) -> None:
        if ctx.dims.stage_ranks == 1:  # one rank per stage: the experts stay whole
            return
        assert ctx.meshes is not None and ctx.meshes.placement is not None
        apply_fssdp(layer, ctx.meshes.placement["fssdp"], self.fssdp_options())

    def step_statistics(
        self,
        model: ModelConfig,
        moe_layers: list[MoELayer],
        moe_ids: list[int],
        ctx: ParallelContext,
    ) -> list[StepStatistics]:
        # one rank per stage reports the plans (every rank of the stage has them)
        E = model.moe.num_experts
        report = ctx.dp_rank == 0
        return [PlanStatistics(moe_layers, moe_ids, model.num_moe_layers, E, report)]


class PlanStatistics:
    """The FSSDP placements of a step, per MoE layer: each layer's dispatcher logs one
    ``PlanStats`` per training call; a row per layer is [replicas per expert (E), max/mean rows,
    (expert, rank) materializations, calls], summed over the step's calls."""

    def __init__(
        self,
        moe_layers: list[MoELayer],
        moe_ids: list[int],
        num_moe_layers: int,
        num_experts: int,
        report: bool = True,
    ) -> None:
        self.layers = list(zip(moe_layers, moe_ids))
        self.num_layers = num_moe_layers
        self.report = report
        # every rank's vector has the same length, whichever layers it holds
        self.rows = torch.zeros(num_moe_layers, num_experts + 3, dtype=torch.float64)
        for layer, _ in self.layers:
            if isinstance(layer.dispatcher, FSSDPDispatcher):
                layer.dispatcher.stats_log = []  # drained every step

    def add(self, index: int, plan: PlanStats) -> None:
        """One placement of MoE layer ``index``."""
        extra = torch.tensor([plan.max_over_mean, plan.materialized, 1.0], dtype=torch.float64)
        self.rows[index] += torch.cat([plan.replicas_E.double(), extra])

    def step_sums(self) -> Tensor:
        for layer, index in self.layers:
            plans = getattr(layer.dispatcher, "stats_log", None) or []
            for plan in plans if self.report else ():
                self.add(index, plan)
            plans.clear()
        sums, self.rows = self.rows.flatten(), torch.zeros_like(self.rows)
        return sums

    def step_fields(self, totals: Tensor) -> dict[str, Any]:
        rows = totals.view(self.num_layers, -1)
        if not rows[:, -1].sum() > 0:
            return {}
        means = [row / row[-1].clamp(min=1) for row in rows]
        return {
            "fssdp_replicas": [m[:-3].tolist() for m in means],
            "fssdp_max_over_mean": [float(m[-3]) for m in means],
            "fssdp_materialized": [float(m[-2]) for m in means],
        }
