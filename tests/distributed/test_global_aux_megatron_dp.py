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
WORLD = 2


def _cpu_shim() -> list[torch.Tensor]:
    """This spawned process only: what Megatron's router needs from a CPU-only torch, and the
    aux losses it hands to ``MoEAuxLossAutoScaler`` recorded in the returned list."""
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe import router as mcore_router

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    moe_utils.te_general_gemm = None  # undefined without Transformer Engine
    scaler = moe_utils.MoEAuxLossAutoScaler
    scaler.main_loss_backward_scale = torch.tensor(1.0)
    recorded: list[torch.Tensor] = []

    class Recording:
        @staticmethod
        def apply(activation: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
            recorded.append(aux_loss.detach().clone())
            return scaler.apply(activation, aux_loss)

    mcore_router.MoEAuxLossAutoScaler = Recording  # type: ignore[misc]
    return recorded


def _megatron_router(rank: int, world_size: int):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=D,
        num_attention_heads=1,
        num_moe_experts=E,
        moe_ffn_hidden_size=F,
        moe_router_topk=K,
        moe_aux_loss_coeff=COEFF,
        moe_router_load_balancing_type="global_aux_loss",
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        add_bias_linear=False,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    # tp = cp = 1: each rank its own tensor/context group; the world is the data-parallel group
    singles = [dist.new_group([r]) for r in range(world_size)]
    own = singles[rank]
    pgs = ProcessGroupCollection(tp=own, cp=own, tp_cp=own, tp_dp_cp=dist.group.WORLD)
    router = TopKRouter(cfg, pg_collection=pgs)
    router.set_layer_number(1)
    return router.train()


def _moetrain_layer(weight_ED: torch.Tensor, reduce_counts: bool):
    from moetrain.moe.config import MoEConfig
    from moetrain.moe.layer import MoELayer

    layer = MoELayer(
        MoEConfig(
            num_experts=E,
            top_k=K,
            dim=D,
            hidden_dim=F,
            aux_loss_coeff=COEFF,
            aux_loss_scope="global",
            z_loss_coeff=0.0,
        )
    )
    with torch.no_grad():
        layer.router.weight_ED.copy_(weight_ED)
    if reduce_counts:

        def sum_over_ranks(counts_E: torch.Tensor) -> torch.Tensor:
            total = counts_E.clone()
            dist.all_reduce(total)
            return total

        layer.reduce_global_counts = sum_over_ranks
    return layer.train()


def _moetrain_call(layer, x_BSD: torch.Tensor) -> tuple[float, torch.Tensor]:
    layer.router.weight_ED.grad = None
    y = layer(x_BSD)
    y.backward(torch.zeros_like(y))
    return layer.last_stats.aux_loss.item(), layer.router.weight_ED.grad.clone()


def global_aux_worker(rank: int, world_size: int) -> list[dict]:
    """Per call on this rank: Megatron's aux loss and router-weight gradient (zero upstream
    gradient on its probs), moetrain's with DP-reduced counts, and moetrain's with this rank's
    counts only (a layer that forgot the reduction)."""
    recorded = _cpu_shim()
    router = _megatron_router(rank, world_size)
    with torch.no_grad():  # the same router weight on every rank
        router.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(1)) * 0.5)
    weight = router.weight.detach().clone()
    layer = _moetrain_layer(weight, reduce_counts=True)
    unreduced = _moetrain_layer(weight, reduce_counts=False)

    g = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens
    xs = [
        torch.randn(B, S, D, generator=g) + 1.5 * torch.randn(D, generator=g) for _ in range(CALLS)
    ]
    router.reset_global_aux_loss_tracker()
    layer.start_step(0)
    unreduced.start_step(0)
    out = []
    for x in xs:
        scores = torch.softmax(x.reshape(-1, D) @ weight.T, dim=-1)
        top = scores.topk(K + 1, dim=-1).values
        router.weight.grad = None
        n = len(recorded)
        probs, _ = router(x.transpose(0, 1).contiguous())  # Megatron is sequence-first
        probs.backward(torch.zeros_like(probs))
        assert len(recorded) == n + 1
        value, grad = _moetrain_call(layer, x)
        unreduced_value, _ = _moetrain_call(unreduced, x)
        out.append(
            dict(
                ref_value=recorded[-1].item(),
                ref_grad=router.weight.grad.clone(),
                value=value,
                grad=grad,
                unreduced_value=unreduced_value,
                min_topk_gap=(top[:, K - 1] - top[:, K]).min().item(),
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
