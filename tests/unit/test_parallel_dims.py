"""ParallelDims: degree resolution, folding, validation messages and rank arithmetic."""

from __future__ import annotations

import pytest

from moetrain.parallel import LayoutError, ParallelDims


def test_design_examples():
    # docs/design.md: world 4, ep=2 alone -> dp_shard=4, ep=2, edp=2
    d = ParallelDims(world_size=4, ep=2)
    assert (d.dp_shard, d.ep, d.edp, d.dp) == (4, 2, 2, 4)
    # tp=2 ep=2 -> dp_shard=2; etp=1: edp=2; etp=2: edp=1
    d = ParallelDims(world_size=4, tp=2, ep=2)
    assert (d.dp_shard, d.edp) == (2, 2)
    assert ParallelDims(world_size=4, tp=2, ep=2, etp=2).edp == 1
    assert ParallelDims(world_size=8, dp_replicate=2, ep=2).edp == 4


@pytest.mark.parametrize(
    "kwargs,setting,fragment",
    [
        (dict(world_size=4, ep=3), "parallel.ep", "does not divide dp_shard x cp x tp = 4"),
        (dict(world_size=4, tp=2, ep=4, etp=2), "parallel.ep", "does not divide dp_shard x cp = 2"),
        (dict(world_size=4, dp_shard=3), "parallel", "the world size is 4"),
        (dict(world_size=6, pp=4), "parallel", "not divisible by pp x dp_replicate x cp x tp = 4"),
        (dict(world_size=6, cp=4), "parallel", "not divisible by pp x dp_replicate x cp x tp = 4"),
        (dict(world_size=4, cp=2, ep=8), "parallel.ep", "does not divide dp_shard x cp x tp = 4"),
        (dict(world_size=4, cp=0), "parallel.cp", ">= 1"),
        (dict(world_size=4, cp=2, tp=2, etp=2), "parallel.etp", "does not combine with"),
        (dict(world_size=4, tp=2, etp=3), "parallel.etp", "must be 1 or equal to parallel.tp=2"),
        (dict(world_size=4, tp=0), "parallel.tp", ">= 1"),
    ],
)
def test_bad_layouts(kwargs, setting, fragment):
    with pytest.raises(LayoutError) as info:
        ParallelDims(**kwargs)
    assert str(info.value).startswith(setting + ":") and fragment in str(info.value)


def model_config(**changes):
    from moetrain.models import ModelConfig
    from moetrain.moe import MoEConfig

    moe = MoEConfig(
        num_experts=changes.pop("moe_experts", 8),
        top_k=2,
        dim=64,
        hidden_dim=changes.pop("moe_hidden", 256),
    )
    shape = dict(
        vocab_size=384,
        dim=64,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        dense_hidden_dim=256,
        moe=moe,
    )
    shape.update(changes)
    return ModelConfig(**shape)


@pytest.mark.parametrize(
    "kwargs,changes,setting",
    [
        (dict(world_size=4, ep=4), dict(moe_experts=6), "parallel.ep"),
        (dict(world_size=4, tp=4), dict(num_kv_heads=2), "parallel.tp"),
        (dict(world_size=4, tp=4), dict(num_heads=6, num_kv_heads=2, head_dim=16), "parallel.tp"),
        (dict(world_size=4, tp=4), dict(vocab_size=258), "parallel.tp"),
        (dict(world_size=4, tp=4), dict(dense_hidden_dim=250), "parallel.tp"),
        (dict(world_size=4, tp=4, etp=4), dict(moe_hidden=250), "parallel.etp"),
        (dict(world_size=2, pp=2), dict(num_layers=3), "parallel.pp"),
        (dict(world_size=2, cp=2), dict(sliding_window=8), "parallel.cp"),
    ],
)
def test_bad_layouts_for_the_model(kwargs, changes, setting):
    dims = ParallelDims(**kwargs)
    dims.validate_model(model_config(), virtual_stages=1 if setting != "parallel.pp" else 2)
    with pytest.raises(LayoutError, match=f"^{setting}:"):
        dims.validate_model(
            model_config(**changes), virtual_stages=2 if "num_layers" in changes else 1
        )


def test_coords_rank_order_and_folding():
    # world 8 = pp2 x dp_shard2 x tp2; rank = (p*2 + s)*2 + t
    d = ParallelDims(world_size=8, pp=2, tp=2, ep=2)
    c = d.coords(6)  # p=1, s=1, t=0
    assert (c.pp, c.dp_replicate, c.dp_shard, c.tp) == (1, 0, 1, 0)
    # etp=1: a stage's dp_shard x tp ranks [4, 5, 6, 7] regroup as edp_shard x ep = 2 x 2
    assert [d.coords(r).ep for r in (4, 5, 6, 7)] == [0, 1, 0, 1]
    assert [d.coords(r).edp for r in (4, 5, 6, 7)] == [0, 0, 1, 1]
    # etp=tp: ep runs over dp_shard; tp ranks split F
    e = ParallelDims(world_size=4, tp=2, ep=2, etp=2)
    assert [(e.coords(r).ep, e.coords(r).etp, e.coords(r).edp) for r in range(4)] == [
        (0, 0, 0),
        (0, 1, 0),
        (1, 0, 0),
        (1, 1, 0),
    ]


def test_cp_axis_rank_order_and_folding():
    # world 8 = dp_shard 2 x cp 2 x tp 2; rank = (s*2 + c)*2 + t; dp (micro-batch streams) = 2
    d = ParallelDims(world_size=8, cp=2, tp=2, ep=4)
    assert (d.dp_shard, d.dp, d.dense_shard, d.edp) == (2, 2, 4, 2)
    c = d.coords(5)  # s=1, c=0, t=1
    assert (c.dp_shard, c.cp, c.tp) == (1, 0, 1)
    # EP folds over a stage's dp_shard x cp x tp ranks, ep innermost
    assert d.ep_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [d.coords(r).edp for r in (0, 3, 4, 7)] == [0, 0, 1, 1]
    assert d.layout()["cp"] == 2 and "cp 2" in d.describe()
    # the cp ranks of one stream share its data-parallel index
    assert {d.coords(r).dp_shard for r in (0, 1, 2, 3)} == {0}


def test_expert_and_layer_placement():
    d = ParallelDims(world_size=4, ep=4)
    assert [list(d.local_experts(r, 8)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    p = ParallelDims(world_size=2, pp=2)
    assert p.layer_ranges(5) == [range(0, 3), range(3, 5)]
    assert p.layer_ranges(4, virtual_stages=2) == [range(i, i + 1) for i in range(4)]


def test_plan_describes_every_rank():
    import torch

    from moetrain.models import ModelConfig, Transformer
    from moetrain.parallel.plan import describe_plan

    cfg = ModelConfig()  # tiny: 4 layers, the first dense, 8 experts of 3*128*256 weights
    with torch.device("meta"):
        model = Transformer(cfg)
    dims = ParallelDims(world_size=4, pp=2, ep=2)
    text = describe_plan(dims, model, cfg.moe.num_experts)
    rows = [line.split() for line in text.splitlines() if line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    assert [r[9] for r in rows] == ["0-1", "0-1", "2-3", "2-3"]  # layers by pp rank
    assert [r[10] for r in rows] == ["0-3", "4-7", "0-3", "4-7"]  # experts by ep rank
    # pp rank 0 holds MoE layer 1, pp rank 1 MoE layers 2-3; experts split over ep=2 only
    per_layer = 8 * 3 * 128 * 256
    assert [int(r[12].replace(",", "")) for r in rows] == [per_layer // 2] * 2 + [per_layer] * 2
    cp = describe_plan(ParallelDims(world_size=4, cp=2, ep=4), model, cfg.moe.num_experts)
    rows = [line.split() for line in cp.splitlines() if line.split()[0].isdigit()]
    assert [r[4] for r in rows] == ["0", "1", "0", "1"]  # the cp column
    assert [r[10] for r in rows] == ["0-1", "2-3", "4-5", "6-7"]  # ep=4 over dp_shard 2 x cp 2
    assert "each sequence split over 2 ranks" in cp
