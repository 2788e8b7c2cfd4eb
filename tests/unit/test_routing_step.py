"""A layer's step state: counter-keyed routing noise and the global aux-loss scope's running
counts, checked against independent emulations on one process (the distributed layouts run the
same in tests/distributed/test_layouts.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moetrain.moe.config import MoEConfig
from moetrain.moe.layer import MoELayer
from moetrain.moe.noise import EVAL, TRAIN, NoiseKey, counter_uniform, fmix32

E, K, D = 6, 2, 8


def make_layer(**kw) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, top_k=K, dim=D, hidden_dim=16, **kw)
    layer = MoELayer(cfg, layer_idx=1)
    layer.reset_parameters(std=0.5)
    return layer.train()


def test_fmix32_matches_murmur3_on_ints_and_tensors():
    def ref(h: int) -> int:
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    values = [0, 1, 0xDEADBEEF, 0xFFFFFFFF, 12345678]
    assert fmix32(1) == 0x514E28B7  # MurmurHash3's finalizer of 1
    assert [fmix32(v) for v in values] == [ref(v) for v in values]
    assert fmix32(torch.tensor(values)).tolist() == [ref(v) for v in values]


def test_counter_uniform_is_uniform_and_keyed():
    key = NoiseKey(seed=7, step=3, layer=2)
    u = counter_uniform(key, 1, torch.arange(4000), 64)
    assert u.dtype == torch.float32 and u.shape == (4000, 64)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005  # 256k draws: sigma 0.0006
    hist = torch.histc(u, bins=16, min=0, max=1) / u.numel()
    assert (hist - 1 / 16).abs().max() < 0.002
    # positions are the only per-token input: a subset at the same positions is the same rows
    assert torch.equal(counter_uniform(key, 1, torch.arange(100, 200), 64), u[100:200])
    for other in (NoiseKey(8, TRAIN, 3, 2), NoiseKey(7, EVAL, 3, 2), NoiseKey(7, TRAIN, 4, 2)):
        assert not torch.equal(counter_uniform(other, 1, torch.arange(100), 64), u[:100])
    assert not torch.equal(counter_uniform(key, 2, torch.arange(100), 64), u[:100])


def routed_ids(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    layer(x)
    assert layer.last_stats is not None
    noise = layer.routing_step.last_noise
    return layer.router(x.reshape(-1, D), None, noise=noise).topk_ids_TK


@pytest.mark.parametrize("kw", [dict(router_jitter=0.5), dict(router_type="random")])
def test_noise_is_the_same_at_dp2_as_in_one_process(kw):
    """Four micro-batches of one step: the single process runs them in order; at dp=2 rank r
    runs micro-batches r and r+2 (moetrain.data.batches' layout). Every token gets the same
    noise, so the same experts and the same aux loss; the next step draws other noise."""
    x = torch.randn(4, 2, 5, D)  # micro-batch, B, S, D
    single = make_layer(**kw)
    single.start_step(9)
    want = [routed_ids(single, x[j]) for j in range(4)]
    ranks = [copy.deepcopy(single) for _ in range(2)]
    got: dict[int, torch.Tensor] = {}
    for r, layer in enumerate(ranks):
        layer.routing_step.data_rank, layer.routing_step.data_ranks = r, 2
        layer.start_step(9)
        for j in range(2):
            got[2 * j + r] = routed_ids(layer, x[2 * j + r])
    for j in range(4):
        assert torch.equal(got[j], want[j]), j
    single.start_step(10)
    assert not all(torch.equal(routed_ids(single, x[j]), want[j]) for j in range(4))


def test_eval_noise_is_numbered_per_evaluation():
    layer = make_layer(router_type="random").eval()
    x = torch.randn(2, 5, D)
    layer.start_step(4)
    first = [routed_ids(layer, x) for _ in range(2)]
    assert not torch.equal(first[0], first[1])  # the second batch's positions follow the first's
    layer.start_step(4)
    assert all(torch.equal(routed_ids(layer, x), ids) for ids in first)


def megatron_style_global_loss(probs_TE, running_counts_E, coeff) -> torch.Tensor:
    """Megatron-Core's global_aux_loss formula written out for one process: tokens-per-expert
    is the running sum over the step's micro-batches so far divided by their number, and the
    loss is E * coeff / (K * T^2) * sum_i(sum_t p_ti * tpe_i)."""
    T = probs_TE.shape[0]
    tpe_E, n = running_counts_E
    return (probs_TE.sum(0) * (tpe_E / n)).sum() * E * coeff / (K * T * T)


def test_global_scope_is_a_running_sum_over_the_step():
    layer = make_layer(aux_loss_coeff=0.1, aux_loss_scope="global")
    xs = torch.randn(4, 3, 4, D)
    layer.start_step(0)
    running = torch.zeros(E)
    for j in range(3):
        layer(xs[j])
        routed = layer.router(xs[j].reshape(-1, D))
        running += torch.bincount(routed.topk_ids_TK.flatten(), minlength=E)
        want = megatron_style_global_loss(routed.probs_TE, (running, j + 1), 0.1)
        assert layer.last_stats is not None
        torch.testing.assert_close(layer.last_stats.aux_loss, want.detach(), rtol=1e-6, atol=0)
        if j:  # not this micro-batch's own counts any more
            own = torch.bincount(routed.topk_ids_TK.flatten(), minlength=E).float()
            alone = megatron_style_global_loss(routed.probs_TE.detach(), (own, 1), 0.1)
            assert abs(float(alone) - float(want.detach())) > 1e-6
    layer.start_step(1)  # a new step starts from its own counts
    layer(xs[3])
    routed = layer.router(xs[3].reshape(-1, D))
    counts = torch.bincount(routed.topk_ids_TK.flatten(), minlength=E).float()
    want = megatron_style_global_loss(routed.probs_TE, (counts, 1), 0.1)
    torch.testing.assert_close(layer.last_stats.aux_loss, want.detach(), rtol=1e-6, atol=0)


def run_step(layer: MoELayer, xs: torch.Tensor, use_checkpoint: bool) -> dict[str, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    layer.start_step(3)
    for x in xs:
        y = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
        (y.square().mean() / len(xs)).backward()
    return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


def test_recomputation_reuses_the_call_key_and_counts_without_a_collective():
    """Under activation checkpointing the backward recomputes each micro-batch: it must draw
    the same jitter and use the same running counts as the original forward, without summing
    counts over ranks again (a collective inside backward)."""
    layer = make_layer(aux_loss_coeff=0.1, aux_loss_scope="global", router_jitter=0.3)
    reduces = []
    layer.reduce_global_counts = lambda c: (reduces.append(1), c * 2)[1]  # a second "rank"
    xs = torch.randn(3, 2, 4, D)
    plain = run_step(layer, xs, use_checkpoint=False)
    assert len(reduces) == 3
    recomputed = run_step(layer, xs, use_checkpoint=True)
    assert len(reduces) == 6  # one per original forward, none in the recomputations
    assert plain.keys() == recomputed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=0, atol=0, msg=name)
    assert layer.routing_step.recomputes == 3


@pytest.mark.parametrize("bias_load", ["assigned", "kept"])
def test_bias_counts_assigned_or_kept_tokens(bias_load):
    layer = make_layer(capacity_factor=0.5, bias_update_rate=0.01, bias_load=bias_load)
    x = torch.randn(2, 6, D)
    layer(x)
    stats = layer.last_stats
    assert stats is not None and int(stats.num_dropped) > 0
    load = layer.router.step_load_E.clone()
    assigned = stats.tokens_per_expert_E
    if bias_load == "assigned":
        torch.testing.assert_close(load, assigned)
    else:  # every expert keeps at most the capacity; the drops are gone from the load
        assert float(load.sum()) == float(assigned.sum()) - int(stats.num_dropped)
        assert int(load.max()) <= int(stats.capacity or 0)
        assert not torch.equal(load, assigned)
