"""Independent oracle: moetrain's global aux-loss scope against Megatron-Core 0.16's
``global_aux_loss`` (its own ``TopKRouter``, run on CPU over a one-process gloo group).

Megatron's global-batch balancing loss for micro-batch j of a step is
``coeff * E / (K * T_tot**2) * sum_i Psum_i * avg_i`` with ``avg`` the running count over
micro-batches 0..j (summed over the data-parallel ranks) divided by j + 1, ``Psum`` this rank's
summed softmax scores and ``T_tot`` this call's tokens times the data-parallel size. With equal
micro-batches and one rank that is moetrain's ``coeff * E * sum_i f_i * P_i``: the values and the
router-weight gradients of every call must agree, and a reset (``reset_global_aux_loss_tracker``
vs ``start_step``) must restart both.

Legend: B sequences, S sequence length, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.transformer.moe import moe_utils

from moetrain.testing.mcore import (
    global_aux_router,
    megatron_call,
    micro_batches,
    moetrain_call,
    moetrain_layer,
    patch_for_cpu,
    topk_gap,
)

E, K, D, F = 8, 2, 16, 8
DIMS = (D, E, F, K)
B, S = 2, 12
COEFF = 0.01
TRACKER_NAME = "global_load_balancing_loss"


@pytest.fixture
def mcore_cpu(monkeypatch):
    """Megatron's router on a CPU-only torch (undone after the test); yields the list of the
    aux losses it backpropagates."""
    recorded = patch_for_cpu(
        lambda obj, name, value: monkeypatch.setattr(obj, name, value, raising=False)
    )
    moe_utils.clear_aux_losses_tracker()
    yield recorded
    moe_utils.clear_aux_losses_tracker()


def tracked() -> float:
    """Megatron's logged value for layer 1: loss / coeff, summed over the calls since the
    tracker was last cleared (``reset_global_aux_loss_tracker`` does not clear it)."""
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    return tracker[TRACKER_NAME]["values"][0].item() if TRACKER_NAME in tracker else 0.0


@pytest.mark.timeout(120)
def test_global_aux_loss_matches_megatron_core(mcore_cpu, one_process_group):
    recorded = mcore_cpu
    # one process: tensor, context and data parallel groups are all the world
    router = global_aux_router(DIMS, COEFF, one_process_group, one_process_group)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(1)) * 0.5)
    weight = router.weight.detach().clone()
    layer = moetrain_layer(DIMS, COEFF, "global", weight)
    local = moetrain_layer(DIMS, COEFF, "micro_batch", weight)

    xs = micro_batches(4, (B, S, D), seed=2)
    # step 0: micro-batches 0, 1, 2; step 1: micro-batch 3 alone
    steps = [(0, xs[:3]), (1, xs[3:])]
    calls = []
    for step, batch in steps:
        router.reset_global_aux_loss_tracker()
        layer.start_step(step)
        local.start_step(step)
        for x in batch:
            assert topk_gap(weight, x, K) > 1e-5  # no ties: both top-k's pick the same set
            before = tracked()
            ref_value, ref_grad = megatron_call(router, x, recorded)
            value, grad = moetrain_call(layer, x)
            local_value, local_grad = moetrain_call(local, x)
            calls.append((ref_value, ref_grad, value, grad, local_value, local_grad))
            # Megatron logs loss / coeff, summed over the calls since the last clear
            assert tracked() - before == pytest.approx(ref_value / COEFF, rel=1e-5)

    for j, (ref_value, ref_grad, value, grad, *_) in enumerate(calls):
        assert value == pytest.approx(ref_value, rel=1e-5), f"call {j}"
        atol = 1e-6 * ref_grad.abs().max().item()  # entries near zero: relative to the scale
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=atol, msg=f"call {j}")
        assert ref_grad.abs().max() > 1e-6  # a gradient that says something

    # first micro-batch of a step: global counts are this call's, the scopes coincide
    for j in (0, 3):
        assert calls[j][4] == pytest.approx(calls[j][0], rel=1e-5)
    # later micro-batches: the per-micro-batch loss is not Megatron's global one
    for j in (1, 2):
        ref_value, ref_grad, *_, local_value, local_grad = calls[j]
        assert abs(local_value - ref_value) > 1e-2 * abs(ref_value), f"call {j}"
        assert (local_grad - ref_grad).abs().max() > 1e-2 * ref_grad.abs().max(), f"call {j}"
