"""A placement is one file: this module defines and registers a toy placement ("replicate every
expert on every rank, all-reduce their gradients") and trains with it at world 2 through the
trainer, editing nothing outside this file. The toy keeps the correctness contract, so its
losses, grad norms and weights equal the single-process run's."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moetrain.moe.layer import MoELayer
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.dims import LayoutError, ParallelDims
from moetrain.parallel.placement import ExpertPlacement, register_placement
from moetrain.testing import run_distributed
from moetrain.testing.layouts import train_steps, write_token_dir


@register_placement
class ReplicateExperts(ExpertPlacement):
    """Every rank holds every expert whole; FSDP leaves them alone (``shards_experts``) and
    their gradients are summed over the data-parallel ranks after the step's backward passes."""

    name = "replicate_experts"
    shards_experts = True

    @classmethod
    def validate_dims(cls, dims: ParallelDims) -> None:
        if dims.ep != 1 or dims.etp != 1 or dims.tp != 1:
            raise LayoutError("parallel.expert_sharding: 'replicate_experts' needs ep=etp=tp=1")

    def describe(self, dims: ParallelDims) -> str:
        return f"experts replicated on all {dims.world_size} ranks"

    def reduce_gradients(self, moe_layers: list[MoELayer], ctx: ParallelContext) -> None:
        for layer in moe_layers:
            for p in layer.experts.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=ctx.group("dp_shard"))


OVERRIDES = ["parallel.expert_sharding=replicate_experts"]


def toy_rank(rank: int, world: int, data_dir: str) -> dict[str, Any]:
    del rank, world
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    seen: dict[str, Any] = {}

    def inspect(trainer) -> None:
        experts = [p for layer in trainer.moe_layers for p in layer.experts.parameters()]
        seen["expert_types"] = {type(p.data).__name__ for p in experts}
        seen["banner"] = trainer.placement.describe(trainer.ctx.dims)

    out = train_steps(data_dir, OVERRIDES, steps=2, prepare=inspect)
    return {**out, **seen}


@pytest.mark.timeout(180)
def test_a_placement_registered_in_a_test_module_trains(tmp_path):
    data_dir = write_token_dir(str(tmp_path / "tokens"))
    ref = train_steps(data_dir, [], steps=2)
    results = run_distributed(toy_rank, 2, data_dir, timeout=150)
    for res in results:
        for key in ("loss", "grad_norm", "aux_loss"):
            torch.testing.assert_close(
                torch.tensor(res[key], dtype=torch.float64),
                torch.tensor(ref[key], dtype=torch.float64),
                rtol=1e-5,
                atol=0,
            )
        # the experts stayed whole (plain tensors, not FSDP's DTensor shards) on every rank
        assert res["expert_types"] == {"Tensor"}
        assert res["banner"] == "experts replicated on all 2 ranks"
        for name, w in ref["weights"].items():
            torch.testing.assert_close(res["weights"][name], w, rtol=0, atol=1e-5, msg=name)


def test_unknown_and_bad_toy_layouts_fail_before_launch():
    with pytest.raises(LayoutError, match="replicate_experts"):
        ParallelDims(world_size=2, ep=2, expert_sharding="replicate_experts")
    with pytest.raises(LayoutError, match=r"must be one of \[.*'replicate_experts'"):
        ParallelDims(world_size=2, expert_sharding="no_such_placement")
