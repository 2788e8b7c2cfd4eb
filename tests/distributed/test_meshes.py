"""The DeviceMeshes ParallelDims builds hold the process groups its rank arithmetic says."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moetrain.parallel import ParallelDims, build_meshes
from moetrain.testing import run_distributed

LAYOUTS = {
    "ep2_folded_dp4": dict(ep=2),
    "tp2_ep2_etp1": dict(tp=2, ep=2),
    "tp2_ep2_etp2": dict(tp=2, ep=2, etp=2),
    "pp2_tp2": dict(pp=2, tp=2),
    "hsdp2x2_ep2": dict(dp_replicate=2, ep=2),
    "pp2_hsdp_fssdp": dict(pp=2, dp_replicate=2, expert_sharding="fssdp"),
}


def group_sum(mesh, axis: str, value: int) -> int:
    t = torch.tensor([value])
    dist.all_reduce(t, group=mesh.get_group(axis))
    return int(t)


def check_groups(rank: int, world_size: int, kwargs: dict) -> None:
    dims = ParallelDims(world_size=world_size, **kwargs)
    meshes = build_meshes(dims, "cpu")
    me = dims.coords(rank)
    # Expected members of each group, from the coordinates alone.
    coords = [dims.coords(r) for r in range(world_size)]
    same = {
        "tp": lambda c: (c.pp, c.dp_replicate, c.dp_shard) == (me.pp, me.dp_replicate, me.dp_shard),
        "dp_shard": lambda c: (c.pp, c.dp_replicate, c.tp) == (me.pp, me.dp_replicate, me.tp),
        "pp": lambda c: (c.dp_replicate, c.dp_shard, c.tp) == (me.dp_replicate, me.dp_shard, me.tp),
    }
    for axis, member in same.items():
        want = sum(c.rank for c in coords if member(c))
        assert group_sum(meshes.dense, axis, rank) == want, axis
    ep_peers = [c for c in coords if c.pp == me.pp and c.edp == me.edp and c.etp == me.etp]
    assert sorted(c.ep for c in ep_peers) == list(range(dims.ep))
    assert group_sum(meshes.experts, "ep", rank) == sum(c.rank for c in ep_peers)
    replicas = [c for c in coords if (c.pp, c.ep, c.etp) == (me.pp, me.ep, me.etp)]
    assert len(replicas) == dims.edp
    flat = meshes.experts["dp_replicate", "edp_shard"]._flatten("edp")
    assert group_sum(flat, "edp", rank) == sum(c.rank for c in replicas)
    if dims.expert_sharding == "fssdp":  # the FSSDP group: a pipeline stage's ranks in order
        assert meshes.placement is not None
        stage = [c.rank for c in coords if c.pp == me.pp]
        assert meshes.placement["fssdp"].mesh.tolist() == stage
        assert group_sum(meshes.placement, "fssdp", rank) == sum(stage)
    else:  # expert parallelism needs no mesh beyond the dense and expert ones
        assert meshes.placement is None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", LAYOUTS)
def test_mesh_groups_match_coordinates(name):
    run_distributed(check_groups, 4, LAYOUTS[name], timeout=90)
