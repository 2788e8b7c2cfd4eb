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
import torch.distributed as dist

pytest.importorskip("megatron.core")

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe import router as mcore_router
from megatron.core.transformer.transformer_config import TransformerConfig

from moetrain.moe.config import MoEConfig
from moetrain.moe.layer import MoELayer

E, K, D, F = 8, 2, 16, 8
B, S = 2, 12
COEFF = 0.01
TRACKER_NAME = "global_load_balancing_loss"


@pytest.fixture
def mcore_cpu(monkeypatch):
    """What the router needs from a CPU-only torch: a 'current device' for its buffers and its
    gate weight, no Transformer-Engine GEMM, an aux-loss gradient scale of 1; and every aux loss
    handed to ``MoEAuxLossAutoScaler`` recorded (the value Megatron backpropagates)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)
    scaler = moe_utils.MoEAuxLossAutoScaler
    monkeypatch.setattr(scaler, "main_loss_backward_scale", torch.tensor(1.0))
    recorded: list[torch.Tensor] = []

    class Recording:
        @staticmethod
        def apply(activation: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
            recorded.append(aux_loss.detach().clone())
            return scaler.apply(activation, aux_loss)

    monkeypatch.setattr(mcore_router, "MoEAuxLossAutoScaler", Recording)
    moe_utils.clear_aux_losses_tracker()
    yield recorded
    moe_utils.clear_aux_losses_tracker()


@pytest.fixture
def one_process_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def megatron_router(world: dist.ProcessGroup) -> mcore_router.TopKRouter:
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
    # one process: tensor, context and data parallel groups are all the world
    pgs = ProcessGroupCollection(tp=world, cp=world, tp_cp=world, tp_dp_cp=world)
    router = mcore_router.TopKRouter(cfg, pg_collection=pgs)
    router.set_layer_number(1)  # else the loss tracker records nothing
    return router.train()


def moetrain_layer(scope: str, weight_ED: torch.Tensor) -> MoELayer:
    layer = MoELayer(
        MoEConfig(
            num_experts=E,
            top_k=K,
            dim=D,
            hidden_dim=F,
            aux_loss_coeff=COEFF,
            aux_loss_scope=scope,
            z_loss_coeff=0.0,
        )
    )
    with torch.no_grad():
        layer.router.weight_ED.copy_(weight_ED)
    return layer.train()


def micro_batches(n: int, seed: int) -> list[torch.Tensor]:
    """[B, S, D] inputs whose routing differs from micro-batch to micro-batch (each has its own
    mean direction), so running counts differ from each call's own counts."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, D, generator=g) + 1.5 * torch.randn(D, generator=g) for _ in range(n)]


def assert_no_ties(weight_ED: torch.Tensor, x_BSD: torch.Tensor) -> None:
    """The K-th and (K+1)-th scores of every token are apart: both top-k's pick the same set."""
    scores = torch.softmax(x_BSD.reshape(-1, D) @ weight_ED.T, dim=-1)
    top = scores.topk(K + 1, dim=-1).values
    assert (top[:, K - 1] - top[:, K]).min() > 1e-5


def megatron_call(router, x_BSD: torch.Tensor, recorded: list) -> tuple[float, torch.Tensor]:
    """One micro-batch through Megatron's router ([S, B, H] input): its global aux loss and the
    router-weight gradient of that loss alone (zero upstream gradient on the probs)."""
    router.weight.grad = None
    n = len(recorded)
    probs, _ = router(x_BSD.transpose(0, 1).contiguous())
    probs.backward(torch.zeros_like(probs))
    assert len(recorded) == n + 1  # exactly one aux loss per call: the global one
    return recorded[-1].item(), router.weight.grad.clone()


def moetrain_call(layer: MoELayer, x_BSD: torch.Tensor) -> tuple[float, torch.Tensor]:
    layer.router.weight_ED.grad = None
    y = layer(x_BSD)
    y.backward(torch.zeros_like(y))
    assert layer.last_stats is not None
    return layer.last_stats.aux_loss.item(), layer.router.weight_ED.grad.clone()


def tracked() -> float:
    """Megatron's logged value for layer 1: loss / coeff, summed over the calls since the
    tracker was last cleared (``reset_global_aux_loss_tracker`` does not clear it)."""
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    return tracker[TRACKER_NAME]["values"][0].item() if TRACKER_NAME in tracker else 0.0


@pytest.mark.timeout(120)
def test_global_aux_loss_matches_megatron_core(mcore_cpu, one_process_group):
    recorded = mcore_cpu
    router = megatron_router(one_process_group)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(1)) * 0.5)
    weight = router.weight.detach().clone()
    layer = moetrain_layer("global", weight)
    local = moetrain_layer("micro_batch", weight)

    xs = micro_batches(4, seed=2)
    # step 0: micro-batches 0, 1, 2; step 1: micro-batch 3 alone
    steps = [(0, xs[:3]), (1, xs[3:])]
    calls = []
    for step, batch in steps:
        router.reset_global_aux_loss_tracker()
        layer.start_step(step)
        local.start_step(step)
        for x in batch:
            assert_no_ties(weight, x)
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
