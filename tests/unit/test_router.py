"""Routers against hand-computed cases.

Most cases use D = E and an identity router weight, so a token's logits are the token itself.
"""

import math
from dataclasses import replace

import pytest
import torch

from moetrain.moe.baseline_routers import HashRouter, RandomRouter
from moetrain.moe.config import MoEConfig
from moetrain.moe.layer import MoELayer
from moetrain.moe.noise import NoiseKey, TokenNoise
from moetrain.moe.topk_router import TopKRouter


def sig(v):
    return 1 / (1 + math.exp(-v))


def identity_router(num_experts=4, top_k=2, **kw):
    """An eval-mode learned router whose logits equal its input (D = E, weight = I)."""
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, dim=num_experts, hidden_dim=8, **kw)
    router = TopKRouter(cfg)
    with torch.no_grad():
        router.weight_ED.copy_(torch.eye(num_experts))
    return router.eval()


def by_id(ids_TK, weights_TK):
    """Sort each token's choices by expert id: the order inside a token is not part of the
    contract, the (id, weight) pairs are."""
    order = ids_TK.argsort(-1)
    return ids_TK.gather(-1, order).tolist(), weights_TK.gather(-1, order)


def assert_routes(out, ids, weights):
    got_ids, got_w = by_id(out.topk_ids_TK, out.topk_weights_TK)
    order = torch.tensor(ids).argsort(-1)
    want_ids = torch.tensor(ids).gather(-1, order).tolist()
    want_w = torch.tensor(weights, dtype=torch.float64).gather(-1, order)
    assert got_ids == want_ids
    torch.testing.assert_close(got_w.double(), want_w, rtol=1e-5, atol=1e-6)


LOGITS = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 2.0, 4.0]])


def test_softmax_topk_normalized():
    out = identity_router()(LOGITS)
    # token 0 keeps experts 1 (logit 3) and 2 (logit 2): weights e^3, e^2 renormalized
    # token 1 keeps experts 3 (logit 4) and 2 (logit 2)
    assert_routes(
        out,
        [[1, 2], [3, 2]],
        [[sig(1.0), sig(-1.0)], [sig(2.0), sig(-2.0)]],
    )


def test_softmax_topk_unnormalized_and_probs():
    out = identity_router(norm_topk_prob=False)(LOGITS)
    z0 = sum(math.exp(v) for v in (1.0, 3.0, 2.0, 0.0))
    z1 = sum(math.exp(v) for v in (0.5, -1.0, 2.0, 4.0))
    assert_routes(
        out,
        [[1, 2], [3, 2]],
        [[math.exp(3) / z0, math.exp(2) / z0], [math.exp(4) / z1, math.exp(2) / z1]],
    )
    want_p = [[math.exp(v) / z0 for v in (1.0, 3.0, 2.0, 0.0)]]
    torch.testing.assert_close(out.probs_TE[:1].double(), torch.tensor(want_p, dtype=torch.float64))
    torch.testing.assert_close(out.logits_TE, LOGITS)


@pytest.mark.parametrize("norm", [True, False])
def test_sigmoid_scores(norm):
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    out = identity_router(score_func="sigmoid", norm_topk_prob=norm)(logits)
    s2, s1 = sig(2.0), sig(1.0)
    want = [[s2 / (s2 + s1), s1 / (s2 + s1)]] if norm else [[s2, s1]]
    assert_routes(out, [[1, 3]], want)
    # aux-loss probabilities: sigmoid scores normalized per token
    scores = [sig(v) for v in (0.0, 2.0, -1.0, 1.0)]
    want_p = torch.tensor([[s / sum(scores) for s in scores]], dtype=torch.float64)
    torch.testing.assert_close(out.probs_TE.double(), want_p)


@pytest.mark.parametrize(("score_func", "norm"), [("softmax", True), ("sigmoid", False)])
def test_routed_scaling_factor(score_func, norm):
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    plain = identity_router(score_func=score_func, norm_topk_prob=norm)(logits)
    scaled = identity_router(score_func=score_func, norm_topk_prob=norm, routed_scaling_factor=2.5)(
        logits
    )
    assert scaled.topk_ids_TK.tolist() == plain.topk_ids_TK.tolist() == [[1, 3]]
    if score_func == "softmax":  # renormalized weights sum to the scaling factor
        want = [[2.5 * sig(1.0), 2.5 * sig(-1.0)]]
    else:
        want = [[2.5 * sig(2.0), 2.5 * sig(1.0)]]
    assert_routes(scaled, [[1, 3]], want)


def test_logit_norm_scale():
    logits = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    out = identity_router(norm_topk_prob=False, logit_norm_scale=2.0)(logits)
    # mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3)
    std = math.sqrt(14 / 3)
    z = [2.0 * (v - 3.0) / std for v in (1.0, 2.0, 3.0, 6.0)]
    p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    assert_routes(out, [[3, 2]], [[p[3], p[2]]])
    torch.testing.assert_close(out.probs_TE.double(), torch.tensor([p], dtype=torch.float64))


# E=8 in 4 groups of 2. Expert 0 has the best logit, but its group's second expert is poor:
# group score (sum of the two best) ranks groups 2 (3.8, 3.5) and 1 (3.9, 3.0) above group 0.
GROUP_LOGITS = torch.tensor([[4.0, -5.0, 3.9, 3.0, 3.8, 3.5, 0.0, 0.0]])


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_group_limited_excludes_best_single_expert(score_func):
    kw = dict(num_groups=4, topk_groups=2, score_func=score_func, norm_topk_prob=False)
    out = identity_router(8, 2, **kw)(GROUP_LOGITS)
    vals = GROUP_LOGITS[0].tolist()
    if score_func == "softmax":
        z = sum(math.exp(v) for v in vals)
        want = [[math.exp(3.9) / z, math.exp(3.8) / z]]  # weights from unmasked scores
    else:
        want = [[sig(3.9), sig(3.8)]]
    assert_routes(out, [[2, 4]], want)
    plain = identity_router(8, 2, score_func=score_func)(GROUP_LOGITS)
    assert sorted(plain.topk_ids_TK[0].tolist()) == [0, 2]


def test_group_score_is_sum_of_top_two():
    # 2 groups of 4, keep 1. Top-2 sums: group 0 2e^3 = 40.2 > group 1 e^3.5 + e = 35.8;
    # by max or by the sum of all four, group 1 would win.
    logits = torch.tensor([[3.0, 3.0, -9.0, -9.0, 3.5, 1.0, 1.0, 1.0]])
    out = identity_router(8, 2, num_groups=2, topk_groups=1)(logits)
    assert_routes(out, [[0, 1]], [[0.5, 0.5]])


def test_group_limited_one_expert_per_group():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 6.0]])
    out = identity_router(4, 2, num_groups=4, topk_groups=2)(logits)
    assert_routes(out, [[1, 2], [3, 2]], [[sig(1.0), sig(-1.0)], [sig(1.0), sig(-1.0)]])


def test_equal_logits_pick_lower_expert():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 2.0], [5.0, 1.0, 5.0, 5.0]])
    out = identity_router()(logits)
    assert_routes(out, [[0, 1], [1, 2], [0, 2]], [[0.5, 0.5]] * 3)


def test_equal_groups_pick_lower_group():
    # groups 1 and 2 tie for first place
    logits = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    out = identity_router(8, 2, num_groups=4, topk_groups=1)(logits)
    assert_routes(out, [[2, 3]], [[0.5, 0.5]])
    # group 2 first; groups 0 and 3 tie for second place
    logits = torch.tensor([[1.0, 1.0, 0.0, 0.0, 2.0, 2.0, 1.0, 1.0]])
    out = identity_router(8, 4, num_groups=4, topk_groups=2, norm_topk_prob=False)(logits)
    z = 4 * math.exp(1) + 2 + 2 * math.exp(2)
    e1, e2 = math.exp(1) / z, math.exp(2) / z
    assert_routes(out, [[0, 1, 4, 5]], [[e1, e1, e2, e2]])


def test_expert_bias_changes_selection_not_weights():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    router = identity_router(bias_update_rate=0.1)
    assert_routes(router(logits), [[0, 1]], [[sig(1.0), sig(-1.0)]])
    router.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    # expert 2 is now chosen, with its unbiased score: weights e^3, e^1 renormalized
    assert_routes(router(logits), [[0, 2]], [[sig(2.0), sig(-2.0)]])


# K=1: the tokens below choose experts [0, 0, 1] then [0, 2].
STEP_1 = torch.tensor([[5.0, 0.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0]])
STEP_2 = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 0.0, 7.0, 0.0]])


def bias_router():
    router = identity_router(4, 1, bias_update_rate=0.1).train()
    for step in (STEP_1, STEP_2):
        router.record_load(router(step).topk_ids_TK)
    return router


def test_update_expert_bias_accumulates_and_resets():
    router = bias_router()
    load = router.update_expert_bias()
    assert load.tolist() == [3.0, 1.0, 1.0, 0.0]
    # mean load 1.25: the overloaded expert 0 goes down, the others up
    torch.testing.assert_close(router.expert_bias_E, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert router.step_load_E.tolist() == [0.0] * 4
    # nothing accumulated since: all loads equal the mean, so the bias stays
    assert router.update_expert_bias().tolist() == [0.0] * 4
    torch.testing.assert_close(router.expert_bias_E, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


def test_update_expert_bias_uses_reduce_load():
    router = bias_router()
    load = router.update_expert_bias(reduce_load=lambda t: t * 2)
    assert load.tolist() == [6.0, 2.0, 2.0, 0.0]
    torch.testing.assert_close(router.expert_bias_E, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    # another "rank" with loads [0, 3, 0, 1]: global [3, 4, 1, 1], mean 2.25
    router = bias_router()
    other = torch.tensor([0.0, 3.0, 0.0, 1.0])
    load = router.update_expert_bias(reduce_load=lambda t: t + other)
    assert load.tolist() == [3.0, 4.0, 1.0, 1.0]
    torch.testing.assert_close(router.expert_bias_E, torch.tensor([-0.1, -0.1, 0.1, 0.1]))


def test_bias_state_eval_and_disabled():
    router = identity_router(4, 1, bias_update_rate=0.1)  # eval: no load accumulated
    router(STEP_1)
    assert router.step_load_E.tolist() == [0.0] * 4
    assert "expert_bias_E" in router.state_dict()
    assert "step_load_E" not in router.state_dict()
    assert identity_router().update_expert_bias() is None


@pytest.mark.parametrize("module_dtype", [torch.float32, torch.bfloat16])
def test_router_math_is_fp32(module_dtype):
    cfg = MoEConfig(num_experts=4, top_k=2, dim=8, hidden_dim=8)
    router = TopKRouter(cfg)
    router.reset_parameters(std=1.0)
    router.to(module_dtype).eval()
    x = torch.randn(6, 8).bfloat16()
    out = router(x)
    for t in (out.logits_TE, out.probs_TE, out.topk_weights_TK):
        assert t.dtype == torch.float32
    want_logits = x.double() @ router.weight_ED.double().t()
    torch.testing.assert_close(out.logits_TE.double(), want_logits, rtol=1e-6, atol=1e-6)


def test_jitter_only_in_training():
    router = identity_router(router_jitter=0.5)
    x = torch.rand(16, 4) + 0.5
    a, b = router(x), router(x)
    assert torch.equal(a.logits_TE, x) and torch.equal(b.logits_TE, x)
    router.train()
    c = router(x)
    assert not torch.equal(c.logits_TE, x)
    # multiplicative noise in [1 - 0.5, 1 + 0.5]
    ratio = c.logits_TE / x
    assert ratio.min() >= 0.5 and ratio.max() <= 1.5
    assert ratio.std() > 0.1


def test_jitter_is_a_function_of_the_key():
    """The noise is keyed by (seed, step, layer, token position), not drawn from torch's RNG:
    the same key gives the same noise whatever the RNG state; another step, seed, layer or
    position gives other noise; and each token's noise depends on its own position only."""
    router = identity_router(router_jitter=0.5).train()
    x = torch.rand(16, 4) + 0.5
    key = NoiseKey(seed=3, step=5, layer=1)
    noise = TokenNoise(key, torch.arange(100, 116))
    torch.manual_seed(0)
    a = router(x, noise=noise).logits_TE
    torch.manual_seed(1)
    assert torch.equal(router(x, noise=noise).logits_TE, a)
    for other in (replace(key, step=6), replace(key, seed=4), replace(key, layer=2)):
        assert not torch.equal(router(x, noise=TokenNoise(other, noise.positions_T)).logits_TE, a)
    # tokens 8..15 alone, at their positions: the same rows as in the whole call
    half = router(x[8:], noise=TokenNoise(key, torch.arange(108, 116))).logits_TE
    assert torch.equal(half, a[8:])
    # the router alone (no key): seed 0, step 0, positions 0..T-1
    local = router(x).logits_TE
    assert torch.equal(local, router(x, noise=TokenNoise(NoiseKey(), torch.arange(16))).logits_TE)


def test_random_router():
    cfg = MoEConfig(
        num_experts=8, top_k=3, dim=4, hidden_dim=8, router_type="random", routed_scaling_factor=2.0
    )
    router = RandomRouter(cfg)
    x = torch.randn(64, 4)
    out = router(x)
    ids = out.topk_ids_TK
    assert ids.shape == (64, 3) and ids.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() < 8
    assert all(len(set(row)) == 3 for row in ids.tolist())
    assert set(ids.flatten().tolist()) == set(range(8))
    assert out.topk_weights_TK.dtype == torch.float32
    assert torch.equal(out.topk_weights_TK, torch.full((64, 3), 2.0 / 3))
    assert out.logits_TE is None and out.probs_TE is None
    # a function of the key only: same key, same experts; the next step, other experts
    key = NoiseKey(seed=1, step=2, layer=0)
    positions = torch.arange(64)
    first = router(x, noise=TokenNoise(key, positions)).topk_ids_TK
    assert torch.equal(router(x, noise=TokenNoise(key, positions)).topk_ids_TK, first)
    later = router(x, noise=TokenNoise(replace(key, step=3), positions)).topk_ids_TK
    assert not torch.equal(later, first)


def test_random_router_is_uniform():
    """Over 20k tokens each expert is picked K/E of the time (within 5 sigma), and each of the
    E*(E-1)/2 expert pairs about equally often (K=2)."""
    E, K, T = 6, 2, 20_000
    cfg = MoEConfig(num_experts=E, top_k=K, dim=4, hidden_dim=8, router_type="random")
    ids = RandomRouter(cfg)(torch.zeros(T, 4)).topk_ids_TK
    counts = torch.bincount(ids.flatten(), minlength=E).double()
    p = K / E
    sigma = math.sqrt(T * p * (1 - p))
    assert (counts - T * p).abs().max() < 5 * sigma
    pairs = torch.bincount(ids.min(1).values * E + ids.max(1).values, minlength=E * E).double()
    pairs = pairs[pairs > 0]
    assert pairs.numel() == E * (E - 1) // 2
    q = 1 / pairs.numel()
    assert (pairs - T * q).abs().max() < 5 * math.sqrt(T * q * (1 - q))


def expected_hash_ids(token_ids, E, K):
    return [
        [((v % 2**31) * 2654435761 % 2**32 % E + k * (E // K)) % E for k in range(K)]
        for v in token_ids
    ]


TOKEN_IDS = [0, 1, 2, 7, 31, 50257, 123456789, 2**31 - 1, 2**31 + 5, 2**40 + 3]


@pytest.mark.parametrize(("E", "K"), [(8, 2), (6, 4), (5, 2), (16, 1)])
def test_hash_router(E, K):
    cfg = MoEConfig(num_experts=E, top_k=K, dim=4, hidden_dim=8, router_type="hash")
    ids = torch.tensor(TOKEN_IDS)
    out = HashRouter(cfg)(torch.randn(len(TOKEN_IDS), 4), ids)
    want = expected_hash_ids(TOKEN_IDS, E, K)
    assert out.topk_ids_TK.tolist() == want
    assert all(len(set(row)) == K for row in want)
    assert torch.equal(out.topk_weights_TK, torch.full((len(TOKEN_IDS), K), 1.0 / K))


def test_hash_router_needs_token_ids():
    cfg = MoEConfig(num_experts=4, top_k=2, dim=4, hidden_dim=8, router_type="hash")
    with pytest.raises(ValueError, match="token_ids"):
        HashRouter(cfg)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="token_ids"):
        HashRouter(cfg)(torch.randn(3, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="token_ids"):
        MoELayer(cfg)(torch.randn(3, 4))


def test_hash_layer_with_batched_token_ids():
    E, K = 8, 2
    cfg = MoEConfig(num_experts=E, top_k=K, dim=4, hidden_dim=8, router_type="hash")
    layer = MoELayer(cfg)
    token_ids = torch.tensor(TOKEN_IDS[:8]).view(2, 4)
    y = layer(torch.randn(2, 4, 4), token_ids=token_ids)
    assert y.shape == (2, 4, 4)
    counts = [0] * E
    for row in expected_hash_ids(TOKEN_IDS[:8], E, K):
        for e in row:
            counts[e] += 1
    assert layer.last_stats.tokens_per_expert_E.tolist() == counts


def test_layer_update_expert_bias():
    cfg = MoEConfig(num_experts=4, top_k=1, dim=4, hidden_dim=8, bias_update_rate=0.1)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight_ED.copy_(torch.eye(4))
    layer(STEP_1)
    layer(STEP_2)
    assert layer.update_expert_bias().tolist() == [3.0, 1.0, 1.0, 0.0]
    torch.testing.assert_close(layer.router.expert_bias_E, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    hash_cfg = MoEConfig(num_experts=4, top_k=1, dim=4, hidden_dim=8, router_type="hash")
    assert MoELayer(hash_cfg).update_expert_bias() is None


def test_router_math_is_fp32_under_autocast():
    cfg = MoEConfig(num_experts=4, top_k=2, dim=8, hidden_dim=8)
    router = TopKRouter(cfg).eval()
    router.reset_parameters()  # built uninitialized (torch.empty), as every module here
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x)
    for t in (out.logits_TE, out.probs_TE, out.topk_weights_TK):
        assert t.dtype == torch.float32
    torch.testing.assert_close(out.logits_TE, x @ router.weight_ED.t())


def test_only_the_layer_records_load():
    from moetrain.moe.reference import reference_moe_per_token

    cfg = MoEConfig(num_experts=4, top_k=1, dim=4, hidden_dim=8, bias_update_rate=0.1)
    layer = MoELayer(cfg).train()
    layer.router(STEP_1)
    reference_moe_per_token(layer, STEP_1)
    assert layer.router.step_load_E.tolist() == [0.0] * 4
    layer(STEP_1)
    assert layer.router.step_load_E.sum().item() == STEP_1.shape[0]
    layer.eval()(STEP_1)  # evaluation does not count toward the step's load
    assert layer.router.step_load_E.sum().item() == STEP_1.shape[0]


def test_balancing_state_stays_fp32_when_the_layer_is_cast():
    cfg = MoEConfig(num_experts=4, top_k=1, dim=4, hidden_dim=8, bias_update_rate=1e-3)
    layer = MoELayer(cfg).to(torch.bfloat16)
    assert layer.router.weight_ED.dtype == torch.bfloat16
    assert layer.router.expert_bias_E.dtype == layer.router.step_load_E.dtype == torch.float32
    layer.router.expert_bias_E.fill_(0.5)
    layer.router.step_load_E.copy_(torch.tensor([257.0, 0.0, 0.0, 0.0]))
    layer.update_expert_bias()
    assert layer.router.expert_bias_E.tolist()[1] == pytest.approx(0.501)
