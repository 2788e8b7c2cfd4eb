"""Single-process pieces of the expert-parallel exchange: chunk plans, segment regrouping, the
node layout of the hierarchical all-to-all and the config checks of both options."""

from __future__ import annotations

import pytest
import torch

from moetrain.config.schema import Config
from moetrain.config.validate import ConfigError, expert_placement, validate
from moetrain.parallel.dims import LayoutError, ParallelDims
from moetrain.parallel.ep import EPOptions
from moetrain.parallel.ep_comm import Splits, segment_order
from moetrain.parallel.ep_overlap import chunk_of_rows, chunk_shares, plan_chunks


def loop_segment_order(counts_AB: torch.Tensor) -> torch.Tensor:
    """The obvious loop: B-major order of A-major segments."""
    starts = (torch.cumsum(counts_AB.flatten(), 0) - counts_AB.flatten()).view_as(counts_AB)
    pieces = [
        torch.arange(int(starts[a, b]), int(starts[a, b] + counts_AB[a, b]))
        for b in range(counts_AB.shape[1])
        for a in range(counts_AB.shape[0])
    ]
    return torch.cat(pieces)


def test_segment_order_matches_the_loop():
    gen = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (2, 3), (4, 2), (3, 5)]:
        counts = torch.randint(0, 4, shape, generator=gen)
        assert torch.equal(segment_order(counts), loop_segment_order(counts))
    assert segment_order(torch.zeros(2, 2, dtype=torch.long)).numel() == 0


@pytest.mark.parametrize("degree", [1, 2, 3, 7])
def test_chunk_shares_and_rows_agree(degree):
    counts = torch.tensor([0, 1, 2, 5, 7, 3])
    shares = chunk_shares(counts, degree)
    assert torch.equal(shares.sum(0), counts)
    assert (shares.max(0).values - shares.min(0).values).max() <= 1  # as even as possible
    chunk = chunk_of_rows(counts, degree)
    seg = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    for c in range(degree):
        assert torch.equal(torch.bincount(seg[chunk == c], minlength=6), shares[c])
    # rows of a segment go to chunks in order: contiguous pieces
    for s in range(counts.numel()):
        assert torch.equal(chunk[seg == s], chunk[seg == s].sort().values)


def test_plan_covers_every_row_once_in_order():
    send = torch.tensor([[2, 0], [1, 3]])  # to (rank, local expert)
    recv = torch.tensor([[1, 1], [0, 4]])  # from (rank, local expert)
    plan = plan_chunks(send, recv, None, 2)
    assert sorted(plan.send_perm_R.tolist()) == list(range(6))
    assert plan.send_rows == [2, 4]
    assert [s.send for s in plan.splits] == [[1, 1], [1, 3]]
    assert [s.recv for s in plan.splits] == [[0, 2], [2, 2]]
    assert [c.tolist() for c in plan.expert_counts] == [[0, 2], [1, 3]]
    for c, order in enumerate(plan.expert_order):
        assert sorted(order.tolist()) == list(range(sum(plan.splits[c].recv)))
    # chunk-major, canonical order inside each chunk
    first = plan.send_perm_R[:2].tolist()
    assert first == sorted(first)


def test_plan_full_matrix_for_the_hierarchical_exchange():
    full_PE = torch.tensor([[2, 0, 1, 3], [1, 1, 0, 4]])  # 2 ranks x 4 experts
    send, recv = full_PE[0].view(2, 2), full_PE[:, 0:2]
    plan = plan_chunks(send, recv, full_PE, 3)
    for split in plan.splits:
        assert split.full_PP is not None
        assert split.full_PP[0].tolist() == split.send
        assert split.full_PP[:, 0].tolist() == split.recv
    total = sum(s.full_PP for s in plan.splits if s.full_PP is not None)
    assert torch.equal(total, full_PE.view(2, 2, 2).sum(-1))


def test_splits_reverse():
    s = Splits([1, 2], [3, 4], torch.tensor([[0, 1], [2, 3]]))
    r = s.reversed()
    assert (r.send, r.recv) == ([3, 4], [1, 2])
    assert r.full_PP is not None and r.full_PP.tolist() == [[0, 2], [1, 3]]


@pytest.mark.parametrize(
    ("kwargs", "per_node", "layout"),
    [
        (dict(world_size=4, ep=4), 2, (2, 2)),
        (dict(world_size=4, ep=2), 2, (1, 2)),  # each EP group inside one node
        (dict(world_size=4, tp=2, ep=2, etp=2), 2, (2, 1)),  # EP ranks a node apart
        (dict(world_size=8, ep=4), 2, (2, 2)),
        (dict(world_size=4, ep=4), 1, (4, 1)),
    ],
)
def test_ep_node_layout(kwargs, per_node, layout):
    assert ParallelDims(**kwargs).ep_node_layout(per_node) == layout


@pytest.mark.parametrize(
    ("kwargs", "per_node", "setting"),
    [
        (dict(world_size=4, ep=4), 3, "parallel.ep_ranks_per_node"),  # does not divide 4
        (dict(world_size=6, ep=3), 2, "parallel.ep_a2a"),  # 2 + 1 ranks on two nodes
        (dict(world_size=12, ep=4), 6, "parallel.ep_a2a"),  # groups differ: 1x4, 2x2
    ],
)
def test_ep_node_layout_errors(kwargs, per_node, setting):
    with pytest.raises(LayoutError, match=setting):
        ParallelDims(**kwargs).ep_node_layout(per_node)


def test_ep_options_checks():
    with pytest.raises(ValueError, match="overlap_chunks"):
        EPOptions(overlap_chunks=0)
    with pytest.raises(ValueError, match="a2a"):
        EPOptions(a2a="ring")
    with pytest.raises(ValueError, match="ranks_per_node"):
        EPOptions(a2a="hierarchical")


def config(world: int, monkeypatch, **parallel) -> Config:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = Config()
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


@pytest.mark.parametrize(
    ("world", "parallel", "fragment"),
    [
        (2, dict(ep=2, ep_overlap_chunks=0), "parallel.ep_overlap_chunks: must be >= 1"),
        (2, dict(ep_overlap_chunks=2), "parallel.ep_overlap_chunks: applies to expert-parallel"),
        (2, dict(ep=2, ep_a2a="ring"), "parallel.ep_a2a: must be one of flat, hierarchical"),
        (2, dict(ep_a2a="hierarchical"), "parallel.ep_a2a: applies to expert-parallel"),
        (4, dict(ep=4, ep_a2a="hierarchical"), "parallel.ep_ranks_per_node: parallel.ep_a2a"),
        (4, dict(ep=4, ep_a2a="hierarchical", ep_ranks_per_node=3), "does not divide"),
        (2, dict(ep=2, ep_ranks_per_node=0), "parallel.ep_ranks_per_node: must be >= 1"),
    ],
)
def test_config_errors(world, parallel, fragment, monkeypatch):
    with pytest.raises((ConfigError, LayoutError), match=fragment):
        validate(config(world, monkeypatch, **parallel))


def test_config_ranks_per_node_from_torchrun(monkeypatch):
    cfg = config(4, monkeypatch, ep=4, ep_a2a="hierarchical", ep_overlap_chunks=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    validate(cfg)
    assert expert_placement(cfg).ep_options() == EPOptions(2, "hierarchical", 2)
    cfg.parallel.ep_ranks_per_node = 4  # the setting wins over the environment
    assert expert_placement(cfg).ep_options().ranks_per_node == 4
