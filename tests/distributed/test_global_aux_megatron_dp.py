"""Independent oracle at data parallelism 2: moetrain's global aux-loss scope against
Megatron-Core 0.16's ``global_aux_loss`` (its own ``TopKRouter`` on CPU, gloo, tp = cp = 1).

Each rank routes its own micro-batches. Megatron's per-rank loss is
``coeff * E / (K * T_tot**2) * sum_i Psum_i * avg_i`` with ``T_tot = d * T_local`` (the tokens of
this micro-batch on all d data-parallel ranks) and ``avg`` the running DP-summed count averaged
over the step's micro-batches so far: its P is this rank's score sum over the *global* token
count, i.e. ``P_local / d``. moetrain's is ``coeff * E * sum_i f_i * P_local_i`` with the same
``f``: so on every rank and call moetrain's value, and its router-weight gradient before any
data-parallel gradient reduction, are exactly d times Megatron's.

Legend: B sequences, S sequence length, D model dim, E experts, K top-k, d data-parallel ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from moetrain.testing import run_distributed

E, K, D, F = 8, 2, 16, 8
B, S = 2, 12
COEFF = 0.01
CALLS = 2
DIMS = (D, E, F, K)
WORLD = 2


def _moetrain_layer(weight_ED: torch.Tensor, reduce_counts: bool):
    from moetrain.testing.mcore import moetrain_layer

    layer = moetrain_layer(DIMS, COEFF, "global", weight_ED)
    if reduce_counts:

        def sum_over_ranks(counts_E: torch.Tensor) -> torch.Tensor:
            total = counts_E.clone()
            dist.all_reduce(total)
            return total

        layer.reduce_global_counts = sum_over_ranks
    return layer


def global_aux_worker(rank: int, world_size: int) -> list[dict]:
    """Per call on this rank: Megatron's aux loss and router-weight gradient (zero upstream
    gradient on its probs), moetrain's with DP-reduced counts, and moetrain's with this rank's
    counts only (a layer that forgot the reduction)."""
    from moetrain.testing.mcore import (
        global_aux_router,
        megatron_call,
        micro_batches,
        moetrain_call,
        patch_for_cpu,
        topk_gap,
    )

    recorded = patch_for_cpu()  # this spawned process only
    # tp = cp = 1: each rank its own tensor/context group; the world is the data-parallel group
    singles = [dist.new_group([r]) for r in range(world_size)]
    router = global_aux_router(DIMS, COEFF, singles[rank], dist.group.WORLD)
    with torch.no_grad():  # the same router weight on every rank
        router.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(1)) * 0.5)
    weight = router.weight.detach().clone()
    layer = _moetrain_layer(weight, reduce_counts=True)
    unreduced = _moetrain_layer(weight, reduce_counts=False)

    xs = micro_batches(CALLS, (B, S, D), seed=100 + rank)  # each rank its own tokens
    router.reset_global_aux_loss_tracker()
    layer.start_step(0)
    unreduced.start_step(0)
    out = []
    for x in xs:
        ref_value, ref_grad = megatron_call(router, x, recorded)
        value, grad = moetrain_call(layer, x)
        unreduced_value, _ = moetrain_call(unreduced, x)
        out.append(
            dict(
                ref_value=ref_value,
                ref_grad=ref_grad,
                value=value,
                grad=grad,
                unreduced_value=unreduced_value,
                min_topk_gap=topk_gap(weight, x, K),
            )
        )
    return out


@pytest.mark.timeout(180)
def test_global_aux_loss_is_dp_times_megatron_core():
    results = run_distributed(global_aux_worker, WORLD, timeout=150)
    for rank, calls in enumerate(results):
        assert len(calls) == CALLS
        for j, c in enumerate(calls):
            where = f"rank {rank} call {j}"
            assert c["min_topk_gap"] > 1e-5, where  # no ties: both top-k's pick the same set
            assert c["value"] == pytest.approx(WORLD * c["ref_value"], rel=1e-5), where
            atol = 1e-6 * WORLD * c["ref_grad"].abs().max().item()
            torch.testing.assert_close(
                c["grad"], WORLD * c["ref_grad"], rtol=1e-5, atol=atol, msg=where
            )
            assert c["ref_grad"].abs().max() > 1e-6, where
            # without the count reduction the loss is another one (the check can fail)
            assert abs(c["unreduced_value"] - c["value"]) > 1e-2 * c["value"], where
    # each rank routed its own tokens: the per-rank losses differ
    for j in range(CALLS):
        assert results[0][j]["ref_value"] != pytest.approx(results[1][j]["ref_value"], rel=1e-3)
