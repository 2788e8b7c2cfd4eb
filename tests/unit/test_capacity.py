from decimal import Decimal
from fractions import Fraction

import pytest
import torch

from moetrain.moe.capacity import capacity_keep_mask, drops_by_position, expert_capacity
from moetrain.moe.config import MoEConfig
from moetrain.moe.dispatcher import Routing, sort_by_expert
from moetrain.moe.layer import MoELayer
from moetrain.moe.reference import naive_keep

T, F = True, False


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "cf", "min_cap", "want"),
    [
        (16, 4, 2, 1.0, 0, 8),
        (16, 4, 2, 1.25, 0, 10),
        (16, 4, 2, 0.5, 0, 4),
        (10, 4, 1, 1.0, 0, 3),  # ceil(2.5)
        (16, 4, 2, 0.5, 5, 5),  # min_capacity floor
        (4, 8, 1, 1.0, 4, 4),
        (4, 8, 1, 1.0, 0, 1),  # ceil(0.5)
    ],
)
def test_expert_capacity(tokens, experts, top_k, cf, min_cap, want):
    assert expert_capacity(tokens, experts, top_k, cf, min_cap) == want


def exact_capacity(tokens: int, experts: int, top_k: int, cf: str, min_cap: int) -> int:
    """max(ceil(cf * T * K / E), min_cap) in integers, cf the decimal the user wrote."""
    num, den = Fraction(cf).as_integer_ratio()
    return max(-(-num * tokens * top_k // (den * experts)), min_cap)


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "cf", "min_cap"),
    [
        (25, 5, 2, "1.1", 0),  # 11 exactly; cf * T * K / E in floats is 11.000000000000002
        (25, 5, 2, "1.1", 12),  # the min_capacity floor still wins
        (200, 4, 1, "1.1", 0),  # 55
        (100, 4, 1, "2.2", 0),  # 55
        (1_312_320, 256, 8, "1.1", 0),  # large T: 45111 exactly, 45112 in floats
        (1_092_800, 64, 8, "0.07", 0),  # 9562 exactly, 9563 in floats
        (16, 4, 2, "1.0", 0),  # exact multiples of factor 1.0
        (1_048_576, 64, 8, "1.0", 0),
        (4096, 128, 6, "1.0", 0),
        (16, 4, 2, "1.25", 0),  # 10
        (100, 8, 2, "1.25", 0),  # 31.25 -> 32
        (30, 3, 1, "0.1", 0),  # 1 exactly
        (31, 3, 1, "0.1", 0),  # 1.0333 -> 2
        (7, 64, 1, "0.1", 0),  # tiny: 0.01 -> 1
        (10**9, 256, 8, "1.3", 4),  # very large T: 40625000
    ],
)
def test_expert_capacity_is_exact(tokens, experts, top_k, cf, min_cap):
    want = exact_capacity(tokens, experts, top_k, cf, min_cap)
    assert expert_capacity(tokens, experts, top_k, float(cf), min_cap) == want


def test_expert_capacity_regression_t25():
    assert expert_capacity(25, 5, 2, 1.1, 0) == 11


@pytest.mark.parametrize("cf", ["0.07", "0.1", "0.55", "1.0", "1.1", "1.25", "1.35", "2.2"])
def test_expert_capacity_grid_matches_rationals(cf):
    for tokens in range(1, 400):
        for experts, top_k in [(4, 1), (5, 2), (8, 2), (64, 8), (10, 6)]:
            got = expert_capacity(tokens, experts, top_k, float(cf), 0)
            assert got == exact_capacity(tokens, experts, top_k, cf, 0), (tokens, experts, top_k)


@pytest.mark.parametrize("cf", [2, Fraction(11, 10), Decimal("1.1")])
def test_expert_capacity_other_number_types(cf):
    assert expert_capacity(25, 5, 2, cf, 0) == exact_capacity(25, 5, 2, str(cf), 0)


# T=4 tokens, K=2, E=3. Expert 0 gets (t0 .6) (t1 .7) (t2 .5) (t3 .9); expert 1 gets
# (t0 .4) (t2 .5) (t3 .1); expert 2 gets (t1 .3).
IDS = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
WEIGHTS = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
# Ties on expert 0: t1 and t3 both .7, t1 wins. Expert 1: t0 .6 is the best.
TIED = torch.tensor([[0.4, 0.6], [0.7, 0.3], [0.5, 0.5], [0.7, 0.3]])
EQUAL = torch.full((4, 2), 0.5)


@pytest.mark.parametrize(
    ("weights", "capacity", "policy", "want"),
    [
        (WEIGHTS, 1, "probs", [[F, F], [F, T], [T, F], [T, F]]),
        (WEIGHTS, 2, "probs", [[F, T], [T, T], [T, F], [T, F]]),
        (WEIGHTS, 1, "position", [[T, T], [F, T], [F, F], [F, F]]),
        (WEIGHTS, 2, "position", [[T, T], [T, T], [T, F], [F, F]]),
        (WEIGHTS, 4, "probs", [[T, T]] * 4),
        (WEIGHTS, 0, "probs", [[F, F]] * 4),
        (TIED, 1, "probs", [[F, T], [T, T], [F, F], [F, F]]),
        (TIED, 3, "probs", [[F, T], [T, T], [T, T], [T, T]]),
        (EQUAL, 1, "probs", [[T, T], [F, T], [F, F], [F, F]]),
        (EQUAL, 2, "probs", [[T, T], [T, T], [T, F], [F, F]]),
    ],
)
def test_capacity_keep_mask(weights, capacity, policy, want):
    keep = capacity_keep_mask(IDS, weights, 3, capacity, policy)
    assert keep.dtype == torch.bool
    assert keep.tolist() == want


def random_routing(seed, tokens=32, experts=8, top_k=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, experts, generator=g).argsort(-1)[:, :top_k]
    # weights on a coarse grid so ties are common
    weights = torch.randint(0, 4, (tokens, top_k), generator=g).float() / 4
    return ids, weights


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("capacity", [1, 3, 6])
def test_keep_mask_matches_naive(seed, policy, capacity):
    ids, weights = random_routing(seed)
    keep = capacity_keep_mask(ids, weights, 8, capacity, policy)
    assert keep.tolist() == naive_keep(ids, weights, 8, capacity, policy)
    # each expert keeps min(load, capacity) assignments
    kept = torch.bincount(ids[keep], minlength=8)
    load = torch.bincount(ids.flatten(), minlength=8)
    assert torch.equal(kept, load.clamp(max=capacity))


def test_drops_by_position():
    # B=2 sequences of S=3 tokens, K=2; dropped per token [1, 0, 2 | 1, 0, 1]
    keep = torch.tensor([[T, F], [T, T], [F, F], [F, T], [T, T], [T, F]])
    assert drops_by_position(keep, 3).tolist() == [2, 0, 3]
    assert drops_by_position(keep, 6).tolist() == [1, 0, 2, 1, 0, 1]


def capacity_layer(**kw):
    cfg = MoEConfig(
        num_experts=4, top_k=2, dim=8, hidden_dim=16, capacity_factor=0.5, min_capacity=0, **kw
    )
    layer = MoELayer(cfg).eval()
    layer.router.reset_parameters(std=1.0)  # peaked routing: some experts overflow
    return layer


def test_layer_stats_flat_input():
    layer = capacity_layer()
    x = torch.randn(16, 8)
    layer(x)
    stats = layer.last_stats
    routed = layer.router(x)
    load = torch.bincount(routed.topk_ids_TK.flatten(), minlength=4)
    want_dropped = int((load - 4).clamp(min=0).sum())  # C = ceil(0.5 * 16 * 2 / 4) = 4
    assert want_dropped > 0
    assert stats.capacity == 4
    assert int(stats.num_dropped) == want_dropped
    assert stats.num_assignments == 32
    assert stats.tokens_per_expert_E.tolist() == load.tolist()
    assert stats.drops_by_position_S is None


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_layer_stats_sequence_input(policy):
    layer = capacity_layer(drop_policy=policy)
    x = torch.randn(4, 8, 8)
    layer(x)
    stats = layer.last_stats
    routed = layer.router(x.reshape(-1, 8))
    keep = naive_keep(routed.topk_ids_TK, routed.topk_weights_TK, 4, 8, policy)  # C = 8
    want_by_pos = [0] * 8
    for t, row in enumerate(keep):
        want_by_pos[t % 8] += row.count(False)
    assert sum(want_by_pos) > 0
    assert int(stats.num_dropped) == sum(want_by_pos)
    assert stats.drops_by_position_S.tolist() == want_by_pos
    assert int(stats.drops_by_position_S.sum()) == int(stats.num_dropped)


def test_dropless_stats():
    cfg = MoEConfig(num_experts=4, top_k=2, dim=8, hidden_dim=16)
    layer = MoELayer(cfg)
    layer(torch.randn(2, 4, 8))
    assert int(layer.last_stats.num_dropped) == 0
    assert layer.last_stats.capacity is None
    assert layer.last_stats.drops_by_position_S is None


def test_sort_by_expert_pads_to_capacity():
    keep = torch.tensor([[F, T], [T, T], [T, F], [T, F]])  # the probs, C=2 mask above
    rows = sort_by_expert(Routing(IDS, WEIGHTS, keep, pad_to_capacity=2), 3)
    assert rows.tokens_per_expert_E.tolist() == [2, 2, 2]
    assert rows.row_token_R.tolist() == [1, 3, 0, 2, 1, -1]
    torch.testing.assert_close(rows.row_weight_R, torch.tensor([0.7, 0.9, 0.4, 0.5, 0.3, 0.0]))
    unpadded = sort_by_expert(Routing(IDS, WEIGHTS, keep), 3)
    assert unpadded.tokens_per_expert_E.tolist() == [2, 2, 1]
    assert unpadded.row_token_R.tolist() == [1, 3, 0, 2, 1]


def test_layer_pad_to_capacity_rows():
    layer = capacity_layer(pad_to_capacity=True)
    seen = []
    dispatch = layer.dispatcher.dispatch

    def spy(x_TD, routing):
        rows_RD, counts = dispatch(x_TD, routing)
        seen.append((rows_RD.shape[0], counts.tolist()))
        return rows_RD, counts

    layer.dispatcher.dispatch = spy
    layer(torch.randn(16, 8))
    assert seen == [(4 * 4, [4, 4, 4, 4])]  # E * C rows, C = 4
