"""Routing research II: Rectify-Router (moetrain.moe.rectify), the dense-to-sparse gate and the
top-k schedule, adaptive per-layer aux coefficients (moetrain.moe.policies).

Hand-computed cases for each rule, then the layer against the naive reference
(moetrain.moe.reference_routes with moetrain.moe.reference_policies), output and gradients."""

from __future__ import annotations

import pytest
import torch

from moetrain.moe import MoEConfig, MoELayer
from moetrain.moe.noise import NoiseKey, TokenNoise
from moetrain.moe.policies import (
    AdaptiveAuxCoefficient,
    dense_select,
    dense_temperature,
    drop_rate,
    gumbel,
    scheduled_top_k,
)
from moetrain.moe.rectify import fill_in, intra_group
from moetrain.moe.reference_routes import reference_routes

D = 16


def moe(**kw) -> MoEConfig:
    base = dict(num_experts=4, top_k=2, dim=D, hidden_dim=24, aux_loss_coeff=0.01)
    base.update(kw)
    return MoEConfig(**base)


# --- hand-computed cases ---------------------------------------------------------------------


def test_intra_group_moves_a_dropped_slot_to_its_groups_best_expert_with_room():
    # 4 experts in groups {0, 1} and {2, 3}; top-1; capacity 1
    cfg = moe(top_k=1, capacity_factor=1.0, expert_groups=2, rectify_intra_group=True)
    probs = torch.tensor(
        [
            [0.7, 0.2, 0.05, 0.05],  # token 0: expert 0, kept
            [0.6, 0.3, 0.05, 0.05],  # token 1: expert 0, dropped -> expert 1 (room)
            [0.5, 0.1, 0.3, 0.1],  # token 2: expert 0, dropped -> expert 1 taken: stays dropped
            [0.1, 0.1, 0.7, 0.1],  # token 3: expert 2, kept
        ]
    )
    ids = torch.tensor([[0], [0], [0], [2]])
    w = torch.ones(4, 1)
    keep = torch.tensor([[True], [False], [False], [True]])
    ids2, w2, keep2 = intra_group(cfg, ids, w, keep, probs, capacity=1)
    assert ids2.flatten().tolist() == [0, 1, 0, 2]
    assert keep2.flatten().tolist() == [True, True, False, True]
    # the moved weight scales by p_new / p_old: 0.3 / 0.6; token 1 outranks token 2 (0.5 > 0.2)
    torch.testing.assert_close(w2.flatten(), torch.tensor([1.0, 0.5, 1.0, 1.0]))
    # expert 3 has room but lies in the other group: nobody moves there
    assert 3 not in ids2.flatten().tolist()


def test_intra_group_position_policy_and_the_tokens_own_experts():
    cfg = moe(
        top_k=2,
        capacity_factor=1.0,
        expert_groups=2,
        rectify_intra_group=True,
        drop_policy="position",
    )
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    # token 0 chose 0 and 1 (0 dropped): its group's other expert is its own, so no move;
    # token 1 chose 3 (dropped) and 0: it moves to 2
    ids = torch.tensor([[0, 1], [3, 0]])
    keep = torch.tensor([[False, True], [False, True]])
    ids2, _, keep2 = intra_group(cfg, ids, torch.ones(2, 2), keep, probs, capacity=1)
    assert ids2.tolist() == [[0, 1], [2, 0]] and keep2.tolist() == [[False, True], [True, True]]


def test_intra_group_gives_a_token_one_slot_per_expert():
    # one group of 4; token 0's two slots (experts 0, 1) were both dropped: both would move to
    # expert 2 (its best with room), so only the first does
    cfg = moe(capacity_factor=1.0, expert_groups=4, rectify_intra_group=True)
    probs = torch.tensor([[0.3, 0.3, 0.25, 0.15]])
    ids = torch.tensor([[0, 1]])
    keep = torch.tensor([[False, False]])
    ids2, _, keep2 = intra_group(cfg, ids, torch.ones(1, 2), keep, probs, capacity=2)
    assert ids2.tolist() == [[2, 1]] and keep2.tolist() == [[True, False]]


def test_gumbel_draws_are_finite_at_the_uniforms_ends():
    class Ends:
        def uniform(self, stream, width):
            return torch.tensor([[0.0, 1.0 - 2.0**-24]])

    g = gumbel(Ends(), 2)  # type: ignore[arg-type]
    assert torch.isfinite(g).all() and g[0, 0] < -2 and g[0, 1] > 16


def test_aux_loss_free_balancing_counts_the_scheduled_slots_only():
    layer = build(dict(top_k=3, top_k_schedule_steps=4, bias_update_rate=1e-3))
    layer.start_step(0)  # k = 1
    layer(torch.randn(2, 12, D))
    assert float(layer.router.step_load_E.sum()) == 24


def test_fill_in_gives_each_experts_room_to_its_best_unrouted_tokens():
    cfg = moe(top_k=1, capacity_factor=1.0, rectify_fill_in=True, routed_scaling_factor=2.0)
    probs = torch.tensor(
        [[0.6, 0.2, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.4, 0.4, 0.1, 0.1]]
    )
    ids = torch.tensor([[0], [0], [2], [1]])
    keep = torch.tensor([[True], [True], [True], [True]])
    ids_TE, w_TE, active = fill_in(cfg, ids, keep, probs, capacity=2)
    # room: expert 0: 0; 1: 1; 2: 1; 3: 2. Expert 1 takes token 1 (0.3 > 0.2 > 0.1);
    # expert 2: tokens 0, 1, 3 tie at 0.1 -> token 0; expert 3: tokens 0 and 1 (ties, earlier)
    assert active.tolist() == [
        [False, False, True, True],
        [False, True, False, True],
        [False, False, False, False],
        [False, False, False, False],
    ]
    assert ids_TE[2].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(w_TE[1], torch.tensor([0.0, 0.6, 0.0, 0.2]))


def test_schedules_by_hand():
    cfg = moe(top_k=4, top_k_start=1, top_k_schedule_steps=6)
    assert [scheduled_top_k(cfg, s) for s in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]
    cfg = moe(dense_to_sparse_steps=4, dense_to_sparse_temperature=[2.0, 0.5])
    assert [dense_temperature(cfg, s) for s in (0, 2, 4)] == [2.0, pytest.approx(1.0), None]
    # the gate: softmax(logits / tau), experts with g >= threshold (at least top_k)
    cfg = moe(top_k=1, dense_to_sparse_steps=4, dense_to_sparse_threshold=0.2)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    ids, w, active = dense_select(cfg, logits, torch.tensor(1.0), None)
    assert ids.tolist() == [[0, 1, 2, 3]] and active.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(w, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    ids, w, active = dense_select(cfg, logits, torch.tensor(8.0), None)  # hotter: all 4 pass
    assert active.all()


def test_drop_rate_and_the_adaptive_update_by_hand():
    # 12 assignments over 4 experts, capacity 3 each: 6 - 3 = 3 above -> d = 0.25
    counts = torch.tensor([6.0, 3.0, 2.0, 1.0])
    assert float(drop_rate(counts, None)) == 0.25
    assert float(drop_rate(counts, 1.5)) == pytest.approx((6 - 4.5) / 12)
    cfg = moe(adaptive_aux_smoothing=0.5, adaptive_aux_sensitivity=0.2)
    a = AdaptiveAuxCoefficient(cfg, initial=0.01)
    a.record(torch.tensor([4.0, 1.0, 1.0, 0.0]))
    a.record(torch.tensor([2.0, 2.0, 1.0, 1.0]))
    assert float(a.update(lambda c: 2 * c)) == 0.25  # reduce doubles: the same shares
    assert float(a.coeff) == pytest.approx(0.5 * 0.01 + 0.5 * 0.2 * 0.25)
    assert float(a.step_counts_E.sum()) == 0  # the next step starts afresh
    assert "coeff" in a.state_dict() and "step_counts_E" not in a.state_dict()
    a.record(torch.ones(4))
    a.discard()
    assert float(a.step_counts_E.sum()) == 0
    a.coeff.fill_(0.01)
    cast = a.to(torch.bfloat16)  # neither the dtype nor the value is rounded
    assert cast.coeff.dtype == torch.float32 and float(cast.coeff) == float(torch.tensor(0.01))


# --- the layer against the naive reference ---------------------------------------------------

OPTIONS = {
    "intra_group_probs": dict(
        top_k=1, capacity_factor=1.0, min_capacity=0, expert_groups=2, rectify_intra_group=True
    ),
    "intra_group_position_fill_in": dict(
        capacity_factor=1.0,
        min_capacity=0,
        expert_groups=2,
        rectify_intra_group=True,
        rectify_fill_in=True,
        drop_policy="position",
    ),
    "fill_in_padded_scaled": dict(
        capacity_factor=1.5,
        min_capacity=0,
        rectify_fill_in=True,
        pad_to_capacity=True,
        routed_scaling_factor=2.0,
        num_experts=8,
        top_k=1,
    ),
    "dense_to_sparse": dict(dense_to_sparse_steps=4, dense_to_sparse_threshold=0.1),
    "top_k_schedule_capacity": dict(
        top_k=3, top_k_schedule_steps=4, capacity_factor=1.0, min_capacity=0, freeze_router=True
    ),
    "node_limited_capacity_rectify": dict(
        num_experts=8,
        top_k=3,
        num_node_groups=4,
        max_node_groups=2,
        capacity_factor=1.0,
        min_capacity=0,
        expert_groups=2,
        rectify_intra_group=True,
    ),
    "node_limited_locality": dict(
        num_experts=8, top_k=2, num_node_groups=2, max_node_groups=1, locality_bias=0.3
    ),
    "adaptive_aux_sequence": dict(
        adaptive_aux_smoothing=0.5, adaptive_aux_sensitivity=1.0, aux_loss_scope="sequence"
    ),
}


POLICY_KEYS = {
    "expert_groups",
    "rectify_intra_group",
    "rectify_fill_in",
    "dense_to_sparse_steps",
    "dense_to_sparse_threshold",
    "top_k_schedule_steps",
    "freeze_router",
    "adaptive_aux_smoothing",
    "adaptive_aux_sensitivity",
    "num_node_groups",
    "max_node_groups",
    "locality_bias",
}
HOME = range(4, 8)  # the locality option's node: experts 4-7 (the placement sets it under EP)


def build(kw: dict, seed: int = 0, sharpen: float = 40.0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(moe(**kw), layer_idx=0)
    with torch.no_grad():  # sharper router scores: distinct choices, real drops
        layer.router.weight_ED.mul_(sharpen)
    if kw.get("locality_bias"):
        layer.router.home_experts = HOME
    return layer


def grads(layer: MoELayer, x: torch.Tensor, out: torch.Tensor, aux: torch.Tensor | None):
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    loss = (out * g).sum() + (0 if aux is None else aux)
    params = [p for p in layer.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return [torch.zeros_like(t) if v is None else v for t, v in zip([x, *params], got)]


def _call(layer: MoELayer, x: torch.Tensor, step: int):
    layer.start_step(step)
    y = layer(x)
    noise = TokenNoise(NoiseKey(0, 0, step, 0), torch.arange(x.shape[0] * x.shape[1]))
    return y, reference_routes(layer, x, step=step, noise=noise)


@pytest.mark.parametrize("step", [0, 2, 5])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_layer_matches_the_naive_reference(option, step):
    layer = build(OPTIONS[option])
    if layer.adaptive_aux is not None:  # a coefficient that has moved
        layer.adaptive_aux.coeff.fill_(0.037 * (step + 1))
    x = torch.randn(2, 12, D, requires_grad=True)
    y, (y_ref, aux_ref, picked) = _call(layer, x, step)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    stats = layer.last_stats
    torch.testing.assert_close(stats.aux_loss + stats.z_loss, aux_ref.float(), rtol=1e-5, atol=1e-7)
    got = grads(layer, x, y, None)
    want = grads(layer, x, y_ref, aux_ref.float())
    names = ["x", *[n for n, p in layer.named_parameters() if p.requires_grad]]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    if layer.cfg.capacity_factor is not None and not layer.cfg.rectify_fill_in:
        kept = int(stats.num_assignments) - int(stats.num_dropped)
        assert kept == sum(len(slots) for slots in picked)


def test_every_option_is_live():
    """Each option changes the output at step 0 against the same layer without it (so the
    comparisons above can fail); intra-group rectification rescues dropped slots."""
    x = torch.randn(2, 12, D)
    for option, kw in OPTIONS.items():
        base_kw = {k: v for k, v in kw.items() if k not in POLICY_KEYS}
        # softer scores: a moved or filled-in slot's weight (its probability) is not negligible
        layer, base = build(kw, sharpen=4.0), build(base_kw, sharpen=4.0)
        if layer.adaptive_aux is not None:  # the coefficient scales the aux loss
            layer.adaptive_aux.coeff.fill_(0.5)
            layer(x)
            base(x)
            assert float(layer.last_stats.aux_loss) > 10 * float(base.last_stats.aux_loss)
            continue
        assert not torch.allclose(layer(x), base(x), atol=1e-4), option
        if kw.get("rectify_intra_group"):
            assert int(layer.last_stats.num_dropped) < int(base.last_stats.num_dropped), option


def test_node_limited_routing_by_hand():
    from moetrain.moe.topk_router import TopKRouter

    # 6 experts in 3 node groups {0,1} {2,3} {4,5}; top-2 within M=1 group: ceil(2/1) = 2 best
    cfg = moe(num_experts=6, top_k=2, num_node_groups=3, max_node_groups=1)
    router = TopKRouter(cfg)
    scores = torch.tensor([[0.30, 0.00, 0.20, 0.19, 0.16, 0.15]])  # group sums .30 .39 .31
    with torch.no_grad():
        router.weight_ED.zero_()
    router._scores = lambda _: scores  # the selection rule on given scores
    out = router(torch.zeros(1, D))
    assert sorted(out.topk_ids_TK.flatten().tolist()) == [2, 3]  # not expert 0, the best one
    # M=2 over top-3: ceil(3/2) = 2 best per group: groups 1 and 2 (.39, .31) beat group 0 (.30)
    cfg3 = moe(num_experts=6, top_k=3, num_node_groups=3, max_node_groups=2)
    router3 = TopKRouter(cfg3)
    router3._scores = lambda _: scores
    assert sorted(router3(torch.zeros(1, D)).topk_ids_TK.flatten().tolist()) == [2, 3, 4]
    # a locality bonus on the node of experts 4-5 wins the group
    cfg_b = moe(num_experts=6, top_k=2, num_node_groups=3, max_node_groups=1, locality_bias=0.1)
    router_b = TopKRouter(cfg_b)
    router_b._scores = lambda _: scores
    router_b.home_experts = range(4, 6)
    out_b = router_b(torch.zeros(1, D))
    assert sorted(out_b.topk_ids_TK.flatten().tolist()) == [4, 5]
    # selection only: the weights stay the router's scores, renormalized
    torch.testing.assert_close(out_b.topk_weights_TK, torch.tensor([[0.16, 0.15]]) / 0.31)


def test_the_schedules_end_in_the_plain_router():
    x = torch.randn(2, 12, D)
    plain = build(dict(top_k=3))
    for kw in (dict(dense_to_sparse_steps=4), dict(top_k_schedule_steps=4, top_k_start=1)):
        layer = build(dict(top_k=3, **kw))
        layer.start_step(4)
        plain.start_step(4)
        torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)
        layer.start_step(0)
        assert not torch.allclose(layer(x), plain(x), atol=1e-4)


def test_dense_gate_widths_shrink_as_it_cools():
    layer = build(dict(dense_to_sparse_steps=8, dense_to_sparse_threshold=0.1, num_experts=8))
    layer.eval()  # no Gumbel noise: the width follows the temperature alone
    layer.router.weight_ED.data.div_(40)  # soft scores: a hot gate passes many experts
    x = torch.randn(4, 16, D)
    widths = []
    for step in (0, 4, 7, 8):
        layer.start_step(step)
        layer(x)
        widths.append(float(layer.last_stats.route_counts[0]) / 64)
    assert widths[0] > widths[1] > widths[2] >= widths[3] == 2.0, widths


def test_frozen_router_never_trains():
    layer = build(dict(top_k_schedule_steps=4, freeze_router=True))
    before = layer.router.weight_ED.detach().clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=1.0)
    layer(torch.randn(2, 12, D)).sum().backward()
    opt.step()
    assert layer.router.weight_ED.grad is None
    torch.testing.assert_close(layer.router.weight_ED, before, rtol=0, atol=0)


def test_adaptive_coefficient_follows_the_layers_drop_rate_and_is_checkpointed():
    layer = build(dict(adaptive_aux_smoothing=0.5, adaptive_aux_sensitivity=1.0))
    assert float(layer.adaptive_aux.coeff) == pytest.approx(0.01)
    x = torch.randn(2, 12, D)
    layer(x)
    counts = layer.last_stats.tokens_per_expert_E.float()
    layer(x)  # two micro-batches of one step
    layer.update_expert_bias()
    want = 0.5 * 0.01 + 0.5 * float(drop_rate(2 * counts, None))
    assert float(layer.adaptive_aux.coeff) == pytest.approx(want)
    state = layer.state_dict()
    fresh = build(dict(adaptive_aux_smoothing=0.5, adaptive_aux_sensitivity=1.0), seed=1)
    fresh.load_state_dict(state)
    assert float(fresh.adaptive_aux.coeff) == pytest.approx(want)
    # the per-layer list stays the starting point
    per_layer = moe(adaptive_aux_smoothing=0.9, aux_loss_coeff_per_layer=[0.02, 0.05])
    assert float(MoELayer(per_layer, layer_idx=1).adaptive_aux.coeff) == pytest.approx(0.05)
    static = MoELayer(moe(aux_loss_coeff_per_layer=[0.02, 0.05]), layer_idx=1)
    assert static.adaptive_aux is None and static.aux_coeff == 0.05


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        (dict(expert_groups=3), "model.moe.expert_groups"),
        (dict(expert_groups=2), "model.moe.expert_groups"),
        (dict(rectify_intra_group=True, capacity_factor=1.0), "model.moe.rectify_intra_group"),
        (dict(rectify_fill_in=True), "model.moe.rectify_fill_in: needs model.moe.capacity_factor"),
        (dict(rectify_fill_in=True, capacity_factor=1.0, top_p=0.5), "model.moe.rectify_fill_in"),
        (dict(dense_to_sparse_steps=0), "model.moe.dense_to_sparse_steps"),
        (dict(dense_to_sparse_steps=3, capacity_factor=1.0), "model.moe.dense_to_sparse_steps"),
        (
            dict(dense_to_sparse_steps=3, dense_to_sparse_temperature=[1.0]),
            "model.moe.dense_to_sparse_temperature",
        ),
        (dict(dense_to_sparse_steps=3, dense_to_sparse_threshold=1.0), "threshold"),
        (dict(top_k_start=3), "model.moe.top_k_start"),
        (dict(top_k_schedule_steps=4, top_p=0.5), "model.moe.top_k_schedule_steps"),
        (dict(freeze_router=True, router_type="random"), "model.moe.freeze_router"),
        (dict(adaptive_aux_smoothing=1.0), "model.moe.adaptive_aux_smoothing"),
        (dict(adaptive_aux_sensitivity=-1.0), "model.moe.adaptive_aux_sensitivity"),
        (
            dict(
                rectify_fill_in=True,
                capacity_factor=1.0,
                bias_update_rate=1e-3,
                bias_load="kept",
                aux_loss_coeff=0.0,
            ),
            "use bias_load=assigned",
        ),
        (dict(num_node_groups=3), "model.moe.num_node_groups"),
        (dict(max_node_groups=1), "model.moe.max_node_groups: needs model.moe.num_node_groups"),
        (dict(num_node_groups=4, max_node_groups=5), "model.moe.max_node_groups"),
        (dict(num_node_groups=4, max_node_groups=1, top_k=2), "fewer than top_k=2"),
        (dict(num_node_groups=2, locality_bias=-0.1), "model.moe.locality_bias"),
        (
            dict(num_node_groups=2, max_node_groups=1, num_groups=2, topk_groups=1),
            "does not combine with num_groups",
        ),
    ],
)
def test_bad_settings_are_one_line(kw, named):
    with pytest.raises(ValueError, match=named) as err:
        moe(**kw)
    assert "\n" not in str(err.value)
