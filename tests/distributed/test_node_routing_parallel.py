"""Node-limited routing (DeepSeek-V3), the locality bias (LocMoE) and the node-deduplicating
exchange (``parallel.ep_a2a=node_dedup``) on 2 simulated nodes of 1 and of 2 ranks.

A layer-level run per rank: the node-deduplicating exchange with node-limited routing and a
locality bias toward the rank's node gives each rank the output and gradients of the single
process running the same layer on that rank's tokens with the same home node (and every
expert's gradient summed over the ranks). Its inter-node bytes — the rows each rank sends over
the peer group, every peer on another node — obey the bound ``T * min(M, N - 1)`` rows per
exchange, where the flat exchange without node limits sends about twice as many. And the
training contract: three steps of ``tiny`` with node-limited routing at ep2, ep4 and ep4 over
the node-deduplicating exchange equal the single process."""

from __future__ import annotations

import copy

import pytest
import torch

from moetrain.testing import run_distributed
from moetrain.testing.layouts import assert_matches, train_steps, train_steps_rank, write_token_dir

T, D, E, K = 32, 16, 8, 4
NODES = 2


def _count_rows(sent: list[tuple[int, int]], remote):
    """Wrap ``all_to_all_single``: record (rows to other nodes, row width) of every row
    exchange (2-D inputs; the split-size exchanges are 1-D)."""
    import torch.distributed as dist

    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        if input.dim() == 2 and input_split_sizes is not None:
            group = kw.get("group")
            me = dist.get_rank(group)
            rows = sum(n for r, n in enumerate(input_split_sizes) if remote(group, me, r))
            sent.append((rows, input.shape[1]))
        return original(output, input, output_split_sizes, input_split_sizes, **kw)

    dist.all_to_all_single = counting
    return original


def _layer(**kw):
    from moetrain.moe import MoEConfig, MoELayer

    cfg = MoEConfig(num_experts=E, top_k=K, dim=D, hidden_dim=24, aux_loss_coeff=0.01, **kw)
    torch.manual_seed(0)
    layer = MoELayer(cfg, layer_idx=0)
    with torch.no_grad():
        layer.router.weight_ED.mul_(10)
    return layer


def _localize(layer, rank: int, world: int) -> None:
    from moetrain.moe.experts import GroupedExperts

    full = layer.experts
    n = E // world
    local = GroupedExperts(layer.cfg, num_experts=n)
    with torch.no_grad():
        for name in ("w1_EFD", "w3_EFD", "w2_EDF"):
            getattr(local, name).copy_(getattr(full, name)[rank * n : (rank + 1) * n])
    layer.experts = local


def _run(layer, x, g):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()
    return y.detach(), x.grad


def _node_rank(rank: int, world: int, per_node: int) -> dict:
    import torch.distributed as dist

    from moetrain.parallel.ep import AllToAllDispatcher
    from moetrain.parallel.ep_comm import build_node_groups
    from moetrain.parallel.ep_dedup import NodeDedupDispatcher

    node = rank // per_node
    home = range(node * E // NODES, (node + 1) * E // NODES)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, D, generator=gen)
    g = torch.randn(T, D, generator=gen)
    out = {}
    groups = build_node_groups([list(range(world))], per_node)
    for name, kw, dedup in (
        ("flat_unlimited", dict(), False),
        ("dedup_unlimited", dict(), True),
        ("dedup_node_limited", dict(num_node_groups=2, max_node_groups=1), True),
        (
            "dedup_node_limited_local",
            dict(num_node_groups=2, max_node_groups=1, locality_bias=0.05),
            True,
        ),
    ):
        reference = _layer(**kw)
        reference.router.home_experts = home if kw.get("locality_bias") else None
        layer = copy.deepcopy(reference)
        _localize(layer, rank, world)
        if dedup:
            layer.dispatcher = NodeDedupDispatcher(E, groups, rank)
        else:
            layer.dispatcher = AllToAllDispatcher(E, group=None)
        y_ref, gx_ref = _run(reference, x, g)
        sent: list = []
        if dedup:  # every peer of the peer group is on another node
            original = _count_rows(sent, lambda group, me, r: group is groups.peers and r != me)
        else:  # the flat group: global ranks, per_node per node
            original = _count_rows(sent, lambda group, me, r: r // per_node != node)
        try:
            y, gx = _run(layer, x, g)
        finally:
            dist.all_to_all_single = original
        expert_grads = {}
        for p_name, p in reference.experts.named_parameters():
            full = p.grad.clone()
            dist.all_reduce(full)  # every rank's tokens reach every expert
            n = E // world
            local = dict(layer.experts.named_parameters())[p_name].grad
            expert_grads[p_name] = (local - full[rank * n : (rank + 1) * n]).abs().max().item()
        out[name] = {
            "y": (y - y_ref).abs().max().item(),
            "x_grad": (gx - gx_ref).abs().max().item(),
            "router_grad": (layer.router.weight_ED.grad - reference.router.weight_ED.grad)
            .abs()
            .max()
            .item(),
            "expert_grads": expert_grads,
            "sent": sent,
        }
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("per_node", [1, 2], ids=["ep2_2x1", "ep4_2x2"])
def test_node_dedup_exchange_matches_and_bounds_inter_node_rows(per_node):
    results = run_distributed(_node_rank, NODES * per_node, per_node, timeout=150)
    for rank, res in enumerate(results):
        for name, r in res.items():
            assert r["y"] < 1e-5 and r["x_grad"] < 1e-5 and r["router_grad"] < 1e-5, (name, r)
            assert max(r["expert_grads"].values()) < 1e-5, (name, r)
        # inter-node bytes per exchange (dispatch, combine and their gradients; fp32): the
        # deduplicating exchange sends at most one [x | w_E | m_E] row per (token, remote node)
        # and one [D] row back, so at most T * min(M, N - 1) rows, whatever top_k is
        bound = T * min(1, NODES - 1) * (D + 2 * E) * 4
        for name in ("dedup_unlimited", "dedup_node_limited", "dedup_node_limited_local"):
            sent = [rows * width * 4 for rows, width in res[name]["sent"]]
            assert len(sent) == 8 and max(sent) <= bound, (rank, name, sent)
        flat = [rows for rows, _ in res["flat_unlimited"]["sent"]]
        assert flat[0] > T, flat  # top-4 of 8 experts: most tokens have several remote experts
        # node limits and the locality bias keep tokens home
        rows = {name: res[name]["sent"][0][0] for name in res}
        assert rows["dedup_node_limited_local"] <= rows["dedup_node_limited"], rows
        assert rows["dedup_node_limited"] < rows["dedup_unlimited"] == T, rows


# --- the training contract -------------------------------------------------------------------

NODE_LIMITED = [
    "model.moe.num_node_groups=4",
    "model.moe.max_node_groups=1",
    "parallel.ep_ranks_per_node=1",
]
LAYOUTS = {
    "ep2": (2, ["parallel.ep=2"]),
    "ep4": (4, ["parallel.ep=4"]),
    "ep4_node_dedup_2x2": (
        4,
        ["parallel.ep=4", "parallel.ep_a2a=node_dedup", "parallel.ep_ranks_per_node=2"],
    ),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_token_dir(str(tmp_path_factory.mktemp("tokens")))


@pytest.fixture(scope="module")
def reference(data_dir) -> dict:
    return train_steps(data_dir, NODE_LIMITED)


@pytest.mark.timeout(120)
def test_node_limited_routing_changes_the_run(reference, data_dir):
    plain = train_steps(data_dir, [])
    assert reference["loss"][1:] != pytest.approx(plain["loss"][1:], rel=1e-5)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_node_limited_routing_at_layout_equals_single_process(layout, reference, data_dir):
    world, overrides = LAYOUTS[layout]
    results = run_distributed(
        train_steps_rank, world, data_dir, [*NODE_LIMITED, *overrides], 3, timeout=200
    )
    assert_matches(results, reference)
