"""ParallelDims: the parallel degrees of a launch, validated once, and every DeviceMesh built
from them.

World size = pp x dp_replicate x dp_shard x cp x tp; ``dp_shard=-1`` takes the ranks left over.
Ranks are laid out with pp outermost and tp innermost (rank = (((p*R + r)*S + s)*C + c)*T + t).
Context parallelism (``cp``) splits each sequence over ``cp`` ranks that share one micro-batch
stream (``moetrain.parallel.cp``); the dense parameters are identical over cp ranks and FSDP
shards them over dp_shard x cp (the mesh axis ``dp_shard_cp``).
Expert parallelism folds into the ranks of one pipeline stage (Megatron-Core's "MoE parallel
folding", torchtitan's dp2ep), so ``ep`` and ``etp`` do not multiply the world:

- ``etp=1`` (experts not tensor-parallel): the dp_shard x cp x tp ranks of a stage, flattened in
  rank order, are regrouped as (edp_shard, ep) with ep innermost; ``ep`` must divide
  dp_shard x cp x tp.
- ``etp=tp``: each tp rank holds a slice of F of its experts; the dp_shard x cp ranks are
  regrouped as (edp_shard, ep); ``ep`` must divide dp_shard x cp.

The remaining factor is the expert-data-parallel degree ``edp = dp_replicate x edp_shard``: each
expert is replicated (or FSDP-sharded) over edp ranks.

``expert_sharding`` names the expert placement (``moetrain.parallel.placement``: ``ep`` by
default, ``fssdp``, or a registered one); the placement adds its own checks and mesh.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from moetrain.models.config import ModelConfig
from moetrain.parallel.placement import placement_class

DENSE_AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EXPERT_AXES = ("pp", "dp_replicate", "edp_shard", "ep", "etp")


class LayoutError(ValueError):
    pass


def _fail(setting: str, why: str) -> None:
    raise LayoutError(f"{setting}: {why}")


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits on every axis."""

    rank: int
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    ep: int
    edp: int  # index among the ranks holding the same experts (over dp_replicate and edp_shard)
    etp: int  # expert tensor-parallel index (0 when etp=1)


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    ep: int = 1
    etp: int = 1
    expert_sharding: str = "ep"
    cp: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "pp", "dp_replicate", "cp", "tp", "ep", "etp"):
            if getattr(self, name) < 1:
                _fail(f"parallel.{name}", f"must be >= 1, got {getattr(self, name)}")
        others = self.pp * self.dp_replicate * self.cp * self.tp
        if self.dp_shard == -1:
            if self.world_size % others:
                _fail(
                    "parallel",
                    f"world size {self.world_size} is not divisible by pp x dp_replicate x cp x "
                    f"tp = {others}; launch a multiple of {others} processes",
                )
            object.__setattr__(self, "dp_shard", self.world_size // others)
        elif self.dp_shard < 1:
            _fail("parallel.dp_shard", f"must be >= 1 or -1 (the rest), got {self.dp_shard}")
        product = others * self.dp_shard
        if product != self.world_size:
            _fail(
                "parallel",
                f"pp x dp_replicate x dp_shard x cp x tp = {self.pp} x {self.dp_replicate} x "
                f"{self.dp_shard} x {self.cp} x {self.tp} = {product}, but the world size is "
                f"{self.world_size}; set parallel.dp_shard=-1 or launch {product} processes",
            )
        self._validate_experts_axes()

    def _validate_experts_axes(self) -> None:
        placement_class(self.expert_sharding).validate_dims(self)
        if self.etp not in (1, self.tp):
            _fail("parallel.etp", f"must be 1 or equal to parallel.tp={self.tp}, got {self.etp}")
        if self.cp > 1 and self.etp > 1:
            _fail(
                "parallel.etp",
                f"expert tensor parallelism (etp={self.etp}) does not combine with parallel.cp="
                f"{self.cp}; use parallel.etp=1 (experts fold over dp_shard x cp x tp)",
            )
        pool, pool_name = self.expert_pool
        if pool % self.ep:
            _fail(
                "parallel.ep",
                f"{self.ep} does not divide {pool_name} = {pool} (the ranks of one pipeline "
                f"stage that experts spread over when etp={self.etp}); pick a divisor of {pool}",
            )

    @property
    def expert_pool(self) -> tuple[int, str]:
        """The per-replica ranks EP folds into, and their name for messages."""
        if self.etp == 1:
            return self.dp_shard * self.cp * self.tp, "dp_shard x cp x tp"
        return self.dp_shard * self.cp, "dp_shard x cp"

    @property
    def edp_shard(self) -> int:
        return self.expert_pool[0] // self.ep

    @property
    def edp(self) -> int:
        return self.dp_replicate * self.edp_shard

    @property
    def stage_ranks(self) -> int:
        """Ranks of one pipeline stage (the ranks MoE layers may regroup)."""
        return self.world_size // self.pp

    @property
    def dp(self) -> int:
        """Data-parallel degree of the dense parts: the number of distinct micro-batch streams
        (the cp ranks of one stream share its micro-batches, each holding part of every
        sequence)."""
        return self.dp_replicate * self.dp_shard

    @property
    def dense_shard(self) -> int:
        """Ranks FSDP shards a dense parameter over inside one replica: dp_shard x cp."""
        return self.dp_shard * self.cp

    def validate_model(self, model: ModelConfig, virtual_stages: int = 1) -> None:
        """Model-dependent checks, before any process group starts."""
        placement_class(self.expert_sharding).validate_model(self, model)
        if self.tp > 1 and model.attention == "mla":  # before the GQA head-count checks
            _fail(
                "model.attention",
                f"'mla' does not support tensor parallelism (parallel.tp={self.tp}); use "
                "parallel.tp=1 (shard with parallel.dp_shard, parallel.ep, parallel.pp instead) "
                "or model.attention=gqa",
            )
        if self.cp > 1:
            self._validate_cp_model(model)
        divisible_by_tp = {
            "model.num_heads": model.num_heads,
            "model.num_kv_heads": model.num_kv_heads,
            "model.dense_hidden_dim": model.dense_hidden_dim,
            "model.vocab_size": model.vocab_size,
        }
        for name, size in divisible_by_tp.items():
            if size % self.tp:
                _fail("parallel.tp", f"{self.tp} does not divide {name}={size}")
        stages = self.pp * virtual_stages
        if stages > model.num_layers:
            _fail(
                "parallel.pp",
                f"pp x virtual stages = {self.pp} x {virtual_stages} = {stages} exceeds "
                f"model.num_layers={model.num_layers}; every stage needs at least one layer",
            )

    def _validate_cp_model(self, model: ModelConfig) -> None:
        if model.sliding_window is not None:
            _fail(
                "parallel.cp",
                f"context parallelism does not support model.sliding_window="
                f"{model.sliding_window} (its ring attention is full causal); use parallel.cp=1 "
                "or model.sliding_window=null",
            )

    def layout(self, virtual_stages: int = 1) -> dict[str, int | str]:
        """The layout as a checkpoint records it: every degree, and the placement's key. A
        resume on an equal layout restores per-rank state exactly."""
        layout: dict[str, int | str] = {
            "world_size": self.world_size,
            "pp": self.pp,
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "cp": self.cp,
            "tp": self.tp,
            "ep": self.ep,
            "etp": self.etp,
            "pp_virtual_stages": virtual_stages,
        }
        layout.update(placement_class(self.expert_sharding).checkpoint_layout(self))
        return layout

    def describe(self) -> str:
        """The dense degrees in one phrase (the placement describes the experts)."""
        return (
            f"world {self.world_size} = pp {self.pp} x dp_replicate {self.dp_replicate} x "
            f"dp_shard {self.dp_shard} x cp {self.cp} x tp {self.tp}"
        )

    # --- rank arithmetic ---------------------------------------------------------------------

    def rank_grid(self) -> torch.Tensor:
        """Ranks laid out as [pp, dp_replicate, dp_shard, cp, tp]."""
        return torch.arange(self.world_size).view(
            self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp
        )

    def expert_grid(self) -> torch.Tensor:
        """Ranks laid out as [pp, dp_replicate, edp_shard, ep, etp]: a rank's expert group is
        its row along ``ep``, its expert replicas lie along (dp_replicate, edp_shard)."""
        grid = self.rank_grid()
        if self.etp == 1:
            flat = grid.reshape(self.pp, self.dp_replicate, self.dp_shard * self.cp * self.tp)
            return flat.view(self.pp, self.dp_replicate, self.edp_shard, self.ep, 1)
        return grid.reshape(self.pp, self.dp_replicate, self.edp_shard, self.ep, self.tp)

    def coords(self, rank: int) -> RankCoords:
        p, r, s, c, t = (int(i) for i in (self.rank_grid() == rank).nonzero()[0])
        _, _, es, e, et = (int(i) for i in (self.expert_grid() == rank).nonzero()[0])
        return RankCoords(rank, p, r, s, c, t, ep=e, edp=r * self.edp_shard + es, etp=et)

    def ep_groups(self) -> list[list[int]]:
        """Every EP group's global ranks, in EP rank order (each increasing)."""
        return self.expert_grid().movedim(3, -1).reshape(-1, self.ep).tolist()

    def ep_node_layout(self, ranks_per_node: int) -> tuple[int, int]:
        """(nodes, EP ranks per node) of every EP group when each run of ``ranks_per_node``
        consecutive global ranks shares a node (torchrun's layout), for the hierarchical
        all-to-all: each group must put the same number L of its ranks on each of its nodes, EP
        ranks [a*L, (a+1)*L) on its a-th node. Raises ``LayoutError`` otherwise."""
        setting = "parallel.ep_ranks_per_node"
        if ranks_per_node < 1 or self.world_size % ranks_per_node:
            _fail(setting, f"{ranks_per_node} does not divide the world size {self.world_size}")
        layouts = set()
        for members in self.ep_groups():
            nodes = [m // ranks_per_node for m in members]
            per_node = nodes.count(nodes[0])
            blocks = [nodes[a : a + per_node] for a in range(0, self.ep, per_node)]
            if self.ep % per_node or any(len(set(b)) != 1 for b in blocks):
                _fail(
                    "parallel.ep_a2a",
                    f"'hierarchical' needs each EP group's ranks split evenly over nodes in EP "
                    f"order; EP group {members} sits on nodes {nodes} with "
                    f"{ranks_per_node} ranks per node; use parallel.ep_a2a=flat",
                )
            layouts.add((len(blocks), per_node))
        if len(layouts) != 1:
            _fail("parallel.ep_a2a", f"EP groups span different node layouts {sorted(layouts)}")
        return layouts.pop()

    def local_experts(self, ep_rank: int, num_experts: int) -> range:
        """The global ids of the experts EP rank ``ep_rank`` holds (contiguous blocks)."""
        per_rank = num_experts // self.ep
        return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)

    def layer_ranges(self, num_layers: int, virtual_stages: int = 1) -> list[range]:
        """Layers of each pipeline stage (pp x virtual_stages chunks, earlier ones larger by at
        most one layer). Stage ``v * pp + p`` runs on pp rank ``p`` (interleaved schedules)."""
        stages = self.pp * virtual_stages
        base, extra = divmod(num_layers, stages)
        bounds = [0]
        for i in range(stages):
            bounds.append(bounds[-1] + base + (1 if i < extra else 0))
        return [range(a, b) for a, b in itertools.pairwise(bounds)]


@dataclass
class Meshes:
    """``dense``: [pp, dp_replicate, dp_shard, cp, tp] (with cp > 1 also the flattened axis
    ``dp_shard_cp``, FSDP's); ``experts``: [pp, dp_replicate, edp_shard, ep, etp] over the same
    ranks (process groups of its own); ``placement``: the expert placement's own mesh, if it
    has one (FSSDP: [pp, fssdp]); ``cp_tp``: with cp > 1, the flattened cp x tp ranks of one
    micro-batch."""

    dense: DeviceMesh
    experts: DeviceMesh
    placement: DeviceMesh | None = None
    cp_tp: DeviceMesh | None = None  # cp > 1: the flattened cp x tp ranks of one micro-batch


def build_meshes(dims: ParallelDims, device_type: str) -> Meshes:
    """Build every mesh; every rank of the default process group must call this, in the same
    order. The default group must have ``dims.world_size`` ranks."""
    world = dist.get_world_size()
    if world != dims.world_size:
        _fail("parallel", f"the process group has {world} ranks, the layout {dims.world_size}")
    dense = DeviceMesh(device_type, dims.rank_grid(), mesh_dim_names=DENSE_AXES)
    cp_tp = None
    if dims.cp > 1:  # flattened axes live on the dense mesh, so FSDP and TP share one root
        dense["dp_shard", "cp"]._flatten("dp_shard_cp")
        cp_tp = dense["cp", "tp"]._flatten("cp_tp")
    experts = DeviceMesh(device_type, dims.expert_grid(), mesh_dim_names=EXPERT_AXES)
    placement = placement_class(dims.expert_sharding).mesh(dims, device_type)
    return Meshes(dense, experts, placement, cp_tp)
