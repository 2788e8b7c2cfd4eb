"""Expert parallelism as a placement (``parallel.expert_sharding=ep``, the default).

EP rank i of a group holds experts ``[i*e, (i+1)*e)`` (e = E/ep) as DTensors ``Shard(0)`` over
the EP axis, and with expert tensor parallelism (``etp=tp``) a slice of each expert's F over the
ETP axis; the rest of a stage's ranks (edp) hold replicas, FSDP-sharded by ``parallelize``.
Tokens reach their experts through the all-to-all dispatcher
(:class:`moetrain.parallel.ep.AllToAllDispatcher`), overlapped in ``parallel.ep_overlap_chunks``
chunks over the flat or hierarchical exchange (``parallel.ep_a2a``), or through the
node-deduplicating dispatcher (:class:`moetrain.parallel.ep_dedup.NodeDedupDispatcher`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, ClassVar

import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Shard, distribute_tensor

from moetrain.models.config import ModelConfig
from moetrain.moe.experts import EXPERT_F_DIM
from moetrain.moe.layer import MoELayer
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.dims import LayoutError, ParallelDims, RankCoords
from moetrain.parallel.ep import A2A_MODES, NODE_MODES, AllToAllDispatcher, EPOptions
from moetrain.parallel.ep_comm import HierarchicalAllToAll, NodeGroups
from moetrain.parallel.ep_dedup import NodeDedupDispatcher
from moetrain.parallel.placement import ExpertPlacement


def _fail(setting: str, why: str) -> None:
    raise ValueError(f"{setting}: {why}")


class EPPlacement(ExpertPlacement):
    name = "ep"
    options: ClassVar[dict[str, Any]] = {
        "ep_overlap_chunks": 1,
        "ep_a2a": "flat",
        "ep_ranks_per_node": None,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._node_groups: NodeGroups | None = None

    @property
    def ranks_per_node(self) -> int | None:
        """``parallel.ep_ranks_per_node``, or torchrun's ``LOCAL_WORLD_SIZE`` when null."""
        if self.values["ep_ranks_per_node"] is not None:
            return int(self.values["ep_ranks_per_node"])
        local = os.environ.get("LOCAL_WORLD_SIZE")
        return int(local) if local else None

    def ep_options(self) -> EPOptions:
        """The all-to-all dispatcher's options (after ``validate``)."""
        by_node = self.values["ep_a2a"] in NODE_MODES
        return EPOptions(
            self.values["ep_overlap_chunks"],
            self.values["ep_a2a"],
            self.ranks_per_node if by_node else None,
        )

    # --- layout level ---------------------------------------------------------------------------

    @classmethod
    def validate_model(cls, dims: ParallelDims, model: ModelConfig) -> None:
        if not model.num_moe_layers:
            return
        E, hidden = model.moe.num_experts, model.moe.hidden_dim
        if E % dims.ep:
            raise LayoutError(f"parallel.ep: {dims.ep} does not divide model.moe.num_experts={E}")
        if hidden % dims.etp:
            raise LayoutError(
                f"parallel.etp: {dims.etp} does not divide model.moe.hidden_dim={hidden} "
                "(expert tensor parallelism splits each expert's hidden dim)"
            )
        groups = model.moe.expert_groups
        per_rank = E // dims.ep
        if model.moe.rectify_intra_group and groups is not None and per_rank % groups:
            warnings.warn(
                f"model.moe.expert_groups={groups} spans expert-parallel ranks ({per_rank} "
                f"experts per rank at parallel.ep={dims.ep}): a rectified slot may go to another "
                "rank than its dropped one, adding all-to-all rows (results are unchanged); "
                f"for rectification without extra traffic use a divisor of {per_rank}",
                stacklevel=2,
            )

    @classmethod
    def rank_experts(
        cls, dims: ParallelDims, coords: RankCoords, num_experts: int
    ) -> tuple[str, int]:
        held = dims.local_experts(coords.ep, num_experts)
        # split over ep and etp, FSDP-sharded over edp_shard
        return f"{held.start}-{held.stop - 1}", dims.ep * dims.etp * dims.edp_shard

    @classmethod
    def share_note(cls) -> str:
        return "experts: split over ep and etp, FSDP-sharded over edp_shard"

    # --- options --------------------------------------------------------------------------------

    def validate(self, dims: ParallelDims) -> None:
        chunks, a2a = self.values["ep_overlap_chunks"], self.values["ep_a2a"]
        per_node = self.values["ep_ranks_per_node"]
        if chunks < 1:
            _fail("parallel.ep_overlap_chunks", f"must be >= 1 (1 = no overlap), got {chunks}")
        if a2a not in A2A_MODES:
            _fail("parallel.ep_a2a", f"must be one of {', '.join(A2A_MODES)}; got {a2a!r}")
        if per_node is not None and per_node < 1:
            _fail("parallel.ep_ranks_per_node", f"must be >= 1 or null, got {per_node}")
        if dims.ep == 1:
            for key in ("ep_overlap_chunks", "ep_a2a"):
                if self.values[key] != self.options[key]:
                    _fail(
                        f"parallel.{key}",
                        "applies to expert-parallel layouts only (parallel.ep > 1)",
                    )
            return
        if a2a in NODE_MODES:
            if self.ranks_per_node is None:
                _fail(
                    "parallel.ep_ranks_per_node",
                    f"parallel.ep_a2a={a2a} needs the ranks per node: set it, or launch "
                    "with torchrun (which sets LOCAL_WORLD_SIZE)",
                )
            dims.ep_node_layout(self.ranks_per_node or 0)
        if a2a == "node_dedup" and chunks > 1:
            _fail(
                "parallel.ep_overlap_chunks",
                "parallel.ep_a2a=node_dedup runs its two levels in turn: set 1, or use "
                "parallel.ep_a2a=flat or hierarchical for overlapped chunks",
            )

    def describe(self, dims: ParallelDims) -> str:
        v = self.values
        exchange = ""
        if dims.ep > 1 and (v["ep_a2a"], v["ep_overlap_chunks"]) != ("flat", 1):
            exchange = f" ({v['ep_a2a']} all-to-all, {v['ep_overlap_chunks']} chunk(s))"
        return f"ep {dims.ep}{exchange}, etp {dims.etp}, edp {dims.edp}"

    # --- run time -------------------------------------------------------------------------------

    def setup(self, ctx: ParallelContext) -> None:
        options = self.ep_options()
        if ctx.dims.ep > 1 and options.a2a in NODE_MODES:
            assert options.ranks_per_node is not None
            self._node_groups = ctx.ep_node_groups(options.ranks_per_node)  # collective

    def apply(self, layer: MoELayer, ctx: ParallelContext) -> None:
        """Shard the routed experts: E over the EP axis, F over the ETP axis; EP > 1 dispatches
        through the all-to-all."""
        apply_ep(layer, ctx, self.ep_options(), self._node_groups)
        if layer.cfg.locality_bias > 0 and ctx.dims.ep > 1:  # LocMoE: this rank's node
            per_node = self.ranks_per_node
            assert per_node is not None  # config validation requires it
            nodes, local = ctx.dims.ep_node_layout(per_node)
            ep_rank = dist.get_rank(ctx.expert_group("ep"))
            n = layer.cfg.num_experts // nodes
            node = ep_rank // local
            layer.router.home_experts = range(node * n, (node + 1) * n)  # type: ignore[assignment]


def apply_ep(
    layer: MoELayer,
    ctx: ParallelContext,
    options: EPOptions | None = None,
    node_groups: NodeGroups | None = None,
) -> None:
    """Shard ``layer``'s routed experts: E over the EP axis, F over the ETP axis; EP > 1
    dispatches through the all-to-all, overlapped in ``options.overlap_chunks`` chunks, over the
    flat exchange or (with ``node_groups``) the hierarchical one."""
    dims = ctx.dims
    assert ctx.meshes is not None
    if dims.ep == 1 and dims.etp == 1:
        return
    options = options or EPOptions()
    experts = layer.experts
    E = layer.cfg.num_experts
    if dims.ep > 1:
        group = ctx.expert_group("ep")
        comm = None
        if node_groups is not None and options.a2a == "node_dedup":
            layer.dispatcher = NodeDedupDispatcher(E, node_groups, dist.get_rank(group))
        else:
            if node_groups is not None:
                comm = HierarchicalAllToAll(node_groups, dist.get_rank(group))
            layer.dispatcher = AllToAllDispatcher(E, group, options.overlap_chunks, comm)
    axes = tuple(a for a, n in (("ep", dims.ep), ("etp", dims.etp)) if n > 1)
    mesh = ctx.meshes.experts[axes]
    for name, f_dim in EXPERT_F_DIM.items():
        weight = getattr(experts, name)
        if weight is None:
            continue
        placements = [Shard(0) if a == "ep" else Shard(f_dim) for a in axes]
        sharded = distribute_tensor(weight.data, mesh, placements, src_data_rank=None)
        experts.register_parameter(name, nn.Parameter(sharded))
    experts.num_experts = E // dims.ep
