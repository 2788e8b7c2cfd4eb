"""Node groups against the expert-parallel placement (config validation) and the plan tool's
line on inter-node token traffic (moetrain.parallel.plan.describe_node_traffic)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from moetrain.config.schema import Config
from moetrain.config.validate import ConfigError, parallel_dims, validate
from moetrain.parallel.dims import LayoutError
from moetrain.parallel.plan import describe_node_traffic
from moetrain.train.cli import compose_config

LIMITED = ["model.moe.num_node_groups=2", "model.moe.max_node_groups=1"]


def config(world: int, monkeypatch, *overrides: str) -> Config:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = OmegaConf.to_object(compose_config(list(overrides)))
    assert isinstance(cfg, Config)
    return cfg


@pytest.mark.parametrize(
    ("world", "overrides", "message"),
    [
        (
            2,
            ["parallel.expert_sharding=fssdp", *LIMITED],
            "model.moe.max_node_groups: node groups follow the expert-parallel placement",
        ),
        (4, ["parallel.ep=4", *LIMITED], "set parallel.ep_ranks_per_node"),
        (
            4,
            ["parallel.ep=4", "parallel.ep_ranks_per_node=1", *LIMITED],
            "model.moe.num_node_groups: 2 node groups do not split over the 4 nodes",
        ),
        (
            4,
            [
                "parallel.ep=4",
                "parallel.ep_ranks_per_node=1",
                "model.moe.num_node_groups=2",
                "model.moe.locality_bias=0.1",
            ],
            "model.moe.num_node_groups",
        ),
        (
            4,
            [
                "parallel.ep=2",
                "parallel.tp=2",
                "parallel.ep_ranks_per_node=2",
                "model.moe.num_node_groups=2",
                "model.moe.locality_bias=0.1",
            ],
            "model.moe.locality_bias: tensor-parallel ranks",
        ),
        (
            4,
            [
                "parallel.ep=4",
                "parallel.ep_a2a=node_dedup",
                "parallel.ep_ranks_per_node=2",
                "model.moe.capacity_factor=1.0",
                "model.moe.pad_to_capacity=true",
            ],
            "model.moe.pad_to_capacity: pads every expert",
        ),
        (
            4,
            [
                "parallel.ep=4",
                "parallel.ep_a2a=node_dedup",
                "parallel.ep_ranks_per_node=2",
                "parallel.ep_overlap_chunks=2",
            ],
            "parallel.ep_overlap_chunks",
        ),
    ],
)
def test_node_groups_must_follow_the_placement(world, overrides, message, monkeypatch):
    cfg = config(world, monkeypatch, *overrides)
    with pytest.raises((ConfigError, LayoutError, ValueError)) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_node_groups_on_nodes_validate(monkeypatch):
    validate(config(4, monkeypatch, "parallel.ep=4", "parallel.ep_ranks_per_node=2", *LIMITED))
    validate(
        config(
            4,
            monkeypatch,
            "parallel.ep=4",
            "parallel.ep_ranks_per_node=1",
            "model.moe.num_node_groups=4",
            "model.moe.max_node_groups=1",
        )
    )
    validate(config(1, monkeypatch, *LIMITED))  # one process: the config's groups alone
    cfg = config(4, monkeypatch, "parallel.ep=4", *LIMITED)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's ranks per node serve as well
    validate(cfg)


def test_plan_line_gives_the_bound(monkeypatch):
    cfg = config(4, monkeypatch, "parallel.ep=4", *LIMITED)
    dims = parallel_dims(cfg)
    moe = cfg.model.moe
    dedup = describe_node_traffic(moe, dims, "node_dedup", 2, 512)
    assert dedup is not None
    # <= min(M, nodes - 1) = 1 row of D + 2E = 144 values per token: 512 * 144 * 4 bytes
    assert "node-limited routing: <= 1 of 2 node groups per token" in dedup
    assert "node_dedup: <= 1 row(s) of 144 values per token" in dedup
    assert f"<= {512 * 144 * 4 / 2**20:.2f} MiB per exchange" in dedup
    flat = describe_node_traffic(moe, dims, "flat", 2, 512)
    assert flat is not None and "up to top_k=2 rows of 128 values" in flat
    assert "parallel.ep_a2a=node_dedup would bound it" in flat
    assert "one node per EP group" in str(describe_node_traffic(moe, dims, "flat", 4, 512))
    single = parallel_dims(config(1, monkeypatch, *LIMITED))
    assert "no inter-node token rows" in str(describe_node_traffic(moe, single, "flat", None, 8))
    plain = config(4, monkeypatch, "parallel.ep=4").model.moe
    assert describe_node_traffic(plain, dims, "flat", None, 512) is None


def test_exports_refuse_node_limited_routing():
    from moetrain.moe.config import MoEConfig
    from moetrain.moe.routes import research_options

    limited = MoEConfig(num_node_groups=2, max_node_groups=1)
    assert research_options(limited) == ["model.moe.max_node_groups=1 (routing research)"]
    assert research_options(MoEConfig(num_node_groups=2, locality_bias=0.1)) == []
