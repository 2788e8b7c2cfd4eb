"""LR schedules, optimizer parameter groups and per-step metrics of the trainer."""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.config.schema import OptimConfig
from moetrain.models import ModelConfig, Transformer
from moetrain.moe import MoEConfig
from moetrain.train.lr import build_scheduler, lr_multiplier
from moetrain.train.metrics import StepStats, bits_per_token
from moetrain.train.optim import build_optimizer, parameter_groups


def test_cosine_schedule_values():
    cfg = OptimConfig(schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    total = 14
    assert [lr_multiplier(s, total, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, total, cfg) == pytest.approx(1.0)
    # halfway through the decay (steps 4..13): 0.1 + 0.9 * 0.5 * (1 + cos(pi/2))
    assert lr_multiplier(4 + 4.5, total, cfg) == pytest.approx(0.55)
    assert lr_multiplier(13, total, cfg) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_linear():
    cfg = OptimConfig(schedule="wsd", warmup_steps=2, min_lr_ratio=0.0, decay_fraction=0.5)
    total = 10  # decay over steps 5..9
    values = [lr_multiplier(s, total, cfg) for s in range(total)]
    assert values[:2] == [0.5, 1.0]
    assert values[2:5] == [1.0, 1.0, 1.0]
    assert values[5:] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_constant_schedule_and_scheduler_drives_every_group():
    cfg = OptimConfig(schedule="constant", warmup_steps=2, lr=0.1)
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.4}], lr=0.1)
    sched = build_scheduler(opt, 10, cfg)
    seen = []
    for _ in range(4):
        seen.extend(g["lr"] for g in opt.param_groups)
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.05, 0.2, 0.1, 0.4, 0.1, 0.4, 0.1, 0.4])


def tiny_model(**moe) -> Transformer:
    moe_cfg = MoEConfig(num_experts=4, top_k=2, dim=32, hidden_dim=16, **moe)
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        dense_hidden_dim=32,
        max_seq_len=16,
        first_k_dense=1,
        moe=moe_cfg,
    )
    return Transformer(cfg)


def test_parameter_groups_decay_and_expert_lr():
    model = tiny_model()
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, expert_lr_multiplier=0.5)
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}

    def group_names(name):
        return {names[id(p)] for p in groups[name]["params"]}

    assert set(groups) == {"decay", "decay_experts", "no_decay"}
    assert groups["decay_experts"]["lr"] == pytest.approx(5e-4)
    assert groups["decay"]["lr"] == groups["no_decay"]["lr"] == 1e-3
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert all(".experts." in n for n in group_names("decay_experts"))
    no_decay = group_names("no_decay")
    assert any("router" in n for n in no_decay) and any("norm" in n for n in no_decay)
    assert all(p.dim() == 1 or "router" in names[id(p)] for p in groups["no_decay"]["params"])
    # every parameter lands in exactly one group
    listed = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(listed) == sorted({id(p) for p in model.parameters()})


@pytest.mark.parametrize(
    "name,impl", [("adamw", "foreach"), ("adamw", "fused"), ("sgd", "for_loop")]
)
def test_build_optimizer_steps(name, impl):
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name=name, implementation=impl, momentum=0.9))
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_step_stats_aggregate_micro_batches():
    model = tiny_model(capacity_factor=0.5)
    stats = StepStats()
    tokens = torch.randint(0, 64, (2, 8))
    layer = model.moe_layers()[0]
    expected_counts = torch.zeros(4)
    expected_aux = expected_drop = 0.0
    for loss in (torch.tensor(2.0), torch.tensor(4.0)):
        model(tokens)
        s = layer.last_stats
        expected_counts += s.tokens_per_expert_E
        expected_aux += s.aux_loss.item()
        expected_drop += int(s.num_dropped)
        stats.add_micro_batch(loss, model.moe_layers())
    row = stats.as_dict()
    assert row["loss"] == 3.0
    assert row["aux_loss"] == pytest.approx(expected_aux / 2)
    assert row["dropped_frac"] == pytest.approx(expected_drop / (2 * 16 * 2))
    assert row["expert_load"][0] == pytest.approx(
        (expected_counts / expected_counts.sum()).tolist()
    )
    assert bits_per_token(math.log(2) * 3) == pytest.approx(3.0)


@pytest.mark.parametrize(
    "cfg,total",
    [
        (OptimConfig(schedule="wsd", warmup_steps=2, min_lr_ratio=0.0, decay_fraction=0.05), 10),
        (OptimConfig(schedule="cosine", warmup_steps=9, min_lr_ratio=0.2), 10),
        (OptimConfig(schedule="cosine", warmup_steps=0, min_lr_ratio=0.2), 1),
    ],
    ids=["wsd_decay_one_step", "cosine_warmup_to_last", "single_step"],
)
def test_last_step_reaches_the_floor(cfg, total):
    assert lr_multiplier(total - 1, total, cfg) == pytest.approx(cfg.min_lr_ratio)


def test_router_entropy_of_uniform_and_one_hot():
    from moetrain.moe.layer import router_entropy

    assert router_entropy(torch.full((3, 8), 1 / 8)).item() == pytest.approx(math.log(8))
    assert router_entropy(torch.eye(4)).item() == pytest.approx(0.0, abs=1e-6)
    assert router_entropy(None).item() == 0.0


def test_step_stats_observability():
    model = tiny_model(capacity_factor=0.5)
    layer = model.moe_layers()[0]
    stats = StepStats()
    drops = torch.zeros(8)
    tokens = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        model(tokens)
        drops += layer.last_stats.drops_by_position_S.float()
        stats.add_micro_batch(torch.tensor(1.0), model.moe_layers())
    row = stats.as_dict()
    # 8 positions in 8 buckets; each position sees B*K = 4 assignments per call, 2 calls
    want = (drops / (2 * 2 * 2)).tolist()
    assert row["dropped_frac_by_position"] == pytest.approx(want)
    assert sum(want) / 8 == pytest.approx(row["dropped_frac"])
    load = stats.load[0]
    assert row["dead_experts"] == [int((load == 0).sum())]
    assert 0 < row["router_entropy"] <= math.log(4) + 1e-6
    dropless = StepStats()
    tiny = tiny_model()
    tiny(tokens)
    dropless.add_micro_batch(torch.tensor(1.0), tiny.moe_layers())
    assert "dropped_frac_by_position" not in dropless.as_dict()
