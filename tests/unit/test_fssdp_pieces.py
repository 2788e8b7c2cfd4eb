"""Single-process pieces of FSSDP: the config and layout checks, how expert shards pack and
assemble, the benchmark's routing skews and the logged placement statistics."""

from __future__ import annotations

import pytest
import torch

from benchmarks.skew import SKEWS, expert_probs, skewed_topk
from moetrain.config.schema import Config
from moetrain.config.validate import ConfigError, expert_placement, validate
from moetrain.parallel.dims import LayoutError, ParallelDims
from moetrain.parallel.fssdp import FSSDPOptions
from moetrain.parallel.fssdp_comm import ShardLayout
from moetrain.parallel.fssdp_placement import PlanStatistics
from moetrain.parallel.fssdp_plan import plan_placement


def config(world: int, monkeypatch, **parallel) -> Config:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = Config()
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


@pytest.mark.parametrize(
    ("world", "parallel", "message"),
    [
        (
            4,
            dict(expert_sharding="fssdp", ep=2),
            "parallel.expert_sharding: 'fssdp' shards every expert over all ranks of a pipeline "
            "stage and does not combine with parallel.ep=2; set parallel.ep=1 or "
            "parallel.expert_sharding=ep",
        ),
        (4, dict(expert_sharding="fssdp", tp=2), "does not combine with parallel.tp=2"),
        (2, dict(expert_sharding="zero3"), "parallel.expert_sharding: must be one of"),
        (2, dict(fssdp_rematerialize=False), "parallel.fssdp_rematerialize: applies to"),
        (2, dict(fssdp_slack=0.2), "parallel.fssdp_slack: applies to"),
        (2, dict(expert_sharding="fssdp", fssdp_slack=-1.0), "parallel.fssdp_slack: must be >= 0"),
        # tiny's experts have F = 256: 3 ranks cannot split it
        (3, dict(expert_sharding="fssdp"), "do not divide model.moe.hidden_dim=256"),
    ],
)
def test_config_errors_name_the_setting(world, parallel, message, monkeypatch):
    with pytest.raises((ConfigError, LayoutError)) as info:
        validate(config(world, monkeypatch, **parallel))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_valid_fssdp_layouts(monkeypatch):
    for world, parallel in [
        (2, dict(expert_sharding="fssdp")),
        (4, dict(expert_sharding="fssdp", pp=2, fssdp_rematerialize=False, fssdp_slack=0.0)),
        (4, dict(expert_sharding="fssdp", dp_replicate=2)),
    ]:
        cfg = config(world, monkeypatch, **parallel)
        validate(cfg)
        assert expert_placement(cfg).fssdp_options() == FSSDPOptions(  # type: ignore[attr-defined]
            cfg.parallel.fssdp_rematerialize, cfg.parallel.fssdp_slack
        )
    dims = ParallelDims(world_size=8, pp=2, dp_replicate=2, expert_sharding="fssdp")
    assert (dims.stage_ranks, dims.expert_sharding) == (4, "fssdp")
    assert dims.layout()["expert_sharding"] == "fssdp"  # the checkpoint layout key
    with pytest.raises(ValueError, match="slack"):
        FSSDPOptions(slack=-0.5)


def test_shard_layout_assembles_and_scatters_back():
    """Shards of [E, F, D] / [E, D, F] weights split on F over N ranks pack into rows; the N
    pieces of an expert assemble to the full weights, and scatter is its inverse."""
    E, F, D, N = 5, 12, 4, 3
    gen = torch.Generator().manual_seed(0)
    w1, w3 = torch.randn(E, F, D, generator=gen), torch.randn(E, F, D, generator=gen)
    w2 = torch.randn(E, D, F, generator=gen)
    f = F // N
    shards = [
        [w1[:, r * f : (r + 1) * f], w3[:, r * f : (r + 1) * f], w2[:, :, r * f : (r + 1) * f]]
        for r in range(N)
    ]
    layout = ShardLayout.of(shards[0], [0, 0, 1], N)
    assert layout.width == 3 * f * D
    assert layout.full_shape(0, 2) == (2, F, D) and layout.full_shape(2, 2) == (2, D, F)
    ids = torch.tensor([1, 4])
    pieces = torch.stack([layout.pack(shards[r], ids) for r in range(N)])  # [N, m, W]
    out = [torch.empty(layout.full_shape(i, 2)) for i in range(3)]
    layout.assemble(pieces, out)
    for got, full in zip(out, (w1, w3, w2)):
        assert torch.equal(got, full[ids])
    assert torch.equal(layout.scatter(out, 2, w1), pieces)
    # scatter of a missing gradient (None) is zero
    zeros = layout.scatter([None, out[1], None], 2, w1)
    assert zeros[..., : f * D].abs().sum() == 0
    assert torch.equal(zeros[..., f * D : 2 * f * D], pieces[..., f * D : 2 * f * D])
    # one row per expert: its shards flattened one after the other
    row = layout.pack(shards[1], torch.tensor([3]))[0]
    assert torch.equal(row, torch.cat([s[3].flatten() for s in shards[1]]))


def test_skews():
    gen = torch.Generator().manual_seed(0)
    for skew in SKEWS:
        p = expert_probs(skew, 8)
        assert p.sum().item() == pytest.approx(1.0)
        ids = skewed_topk(4000, 8, 2, skew, gen)
        assert ids.shape == (4000, 2) and (ids[:, 0] != ids[:, 1]).all()  # distinct per token
    counts = torch.bincount(skewed_topk(4000, 8, 2, "zipf1.5", gen).flatten(), minlength=8)
    assert (counts[:-1] >= counts[1:]).all()  # expert 0 hottest, decreasing
    hot = skewed_topk(100, 8, 2, "hot", gen)
    assert (hot[:, 0] == 0).all() and (hot[:, 1] != 0).all()
    assert skewed_topk(0, 8, 2, "uniform", gen).shape == (0, 2)
    with pytest.raises(ValueError, match="unknown skew"):
        expert_probs("pareto", 8)


def test_plan_statistics_are_logged_per_layer():
    counts = torch.tensor([[6, 2, 2, 0], [6, 2, 2, 0]])
    plan = plan_placement(counts).stats()
    stats = PlanStatistics([], [], num_moe_layers=2, num_experts=4)
    stats.add(1, plan)
    stats.add(1, plan)
    sums = stats.step_sums()
    row = stats.step_fields(sums)
    assert row["fssdp_replicas"] == [[0.0] * 4, [2.0, 1.0, 1.0, 0.0]]
    assert row["fssdp_max_over_mean"][1] == 1.0 and row["fssdp_materialized"][1] == 4.0
    assert stats.step_sums().abs().sum() == 0  # drained: the next step starts empty
    quiet = PlanStatistics([], [], num_moe_layers=2, num_experts=4, report=False)
    assert stats.step_fields(quiet.step_sums()) == {}  # no plan: no fields
    # summed with a rank that does not report (one rank per stage does): the same means
    assert stats.step_fields(sums + quiet.step_sums()) == row
