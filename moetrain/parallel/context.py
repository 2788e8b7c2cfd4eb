"""ParallelContext: this process's place in the launch, its device, meshes and reductions.

One process (no torchrun) gets a context with ``world_size=1`` and no meshes: every reduction is
the identity, so the trainer has one code path. Under torchrun (or any launcher that sets
``WORLD_SIZE``/``RANK``) :func:`init_parallel` starts the default process group — NCCL with
CUDA, gloo otherwise — after the layout was validated, then builds both meshes once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moetrain.parallel.dims import Meshes, ParallelDims, RankCoords, build_meshes
from moetrain.parallel.ep_comm import NodeGroups, build_node_groups


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


@dataclass
class ParallelContext:
    dims: ParallelDims
    rank: int
    device: torch.device
    meshes: Meshes | None  # None in a single process

    @property
    def backend(self) -> str:
        return dist.get_backend() if self.meshes is not None else "none (one process)"

    @property
    def distributed(self) -> bool:
        return self.meshes is not None

    @property
    def coords(self) -> RankCoords:
        return self.dims.coords(self.rank)

    @property
    def dp_rank(self) -> int:
        c = self.coords
        return c.dp_replicate * self.dims.dp_shard + c.dp_shard

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def group(self, axis: str):
        """The process group of a dense-mesh axis (pp, dp_replicate, dp_shard, cp, tp)."""
        assert self.meshes is not None
        return self.meshes.dense.get_group(axis)

    def expert_group(self, axis: str):
        """The process group of an expert-mesh axis (edp_shard, ep, etp, ...)."""
        assert self.meshes is not None
        return self.meshes.experts.get_group(axis)

    def ep_node_groups(self, ranks_per_node: int) -> NodeGroups:
        """This rank's node and peer sub-groups of its EP group (the hierarchical all-to-all).
        Collective: every rank calls it once, in the same place (``parallelize``)."""
        _, per_node = self.dims.ep_node_layout(ranks_per_node)
        return build_node_groups(self.dims.ep_groups(), per_node)

    def all_reduce(self, tensor: torch.Tensor, axes: Sequence[str]) -> torch.Tensor:
        """Sum ``tensor`` in place over the named dense-mesh axes (skipping size-1 ones)."""
        if self.meshes is None:
            return tensor
        names = list(self.meshes.dense.mesh_dim_names or ())
        for axis in axes:
            if self.meshes.dense.size(names.index(axis)) > 1:
                dist.all_reduce(tensor, group=self.group(axis))
        return tensor

    def reduce_over_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks of this stage (what the global batch adds up to)."""
        return self.all_reduce(tensor, ("dp_replicate", "dp_shard"))

    def reduce_over_stages_and_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over pipeline stages and data-parallel ranks (not over tensor- or context-parallel
        ranks: they hold identical copies, once cp ranks summed their loss shares)."""
        return self.all_reduce(tensor, ("pp", "dp_replicate", "dp_shard"))


def close_parallel(ctx: ParallelContext) -> None:
    """Leave the process group (end of a torchrun launch)."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def single_process_context() -> ParallelContext:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return ParallelContext(ParallelDims(world_size=1), 0, device, None)


def _init_default_group(timeout: timedelta) -> None:
    """``env://`` rendezvous, with every key under a prefix named for the torchelastic restart
    attempt. torchrun's agent hosts one TCPStore for all attempts of a run (shared with its
    rendezvous), so without the prefix a restarted worker can read a dead worker's gloo/NCCL
    address from the attempt before and fail with "Connection refused"."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(default_backend(), timeout=timeout)
        return
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(
        default_backend(),
        store=dist.PrefixStore(f"moetrain/attempt_{attempt}", store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )


# how much longer the process group waits for a collective than the step watchdog waits for a
# step: a hang then ends with the watchdog's diagnosis, not a bare backend timeout
PG_TIMEOUT_MARGIN_S = 60.0


def init_parallel(
    dims: ParallelDims, timeout_s: float = 600.0, margin_s: float = PG_TIMEOUT_MARGIN_S
) -> ParallelContext:
    """Join (or start) the default process group for ``dims`` and build the meshes. A
    single-process layout starts nothing. ``dims`` is already validated, so a bad layout never
    reaches a process group.

    ``timeout_s`` is ``parallel.timeout_s``, the step watchdog's limit
    (``moetrain.train.watchdog``); the process group's own collective timeout is
    ``timeout_s + margin_s``, so the watchdog fires first. A group already started (tests) keeps
    its timeout."""
    if dims.world_size == 1:
        return single_process_context()
    if not dist.is_initialized():
        _init_default_group(timedelta(seconds=timeout_s + margin_s))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    meshes = build_meshes(dims, device.type)
    return ParallelContext(dims, dist.get_rank(), device, meshes)
