"""Megatron-Core 0.16 as an independent oracle on CPU: its ``TopKRouter`` with the global-batch
load-balancing loss, beside a moetrain MoE layer with the same router weight (tests only;
megatron-core is a test dependency, imported when these functions run).

Legend: B sequences, S sequence length, D model dim, E experts, F expert hidden dim, K top-k.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moetrain.moe.config import MoEConfig
from moetrain.moe.layer import MoELayer
from moetrain.moe.topk_router import TopKRouter

Setattr = Callable[[Any, str, Any], None]


def patch_for_cpu(setattr_: Setattr = setattr) -> list[torch.Tensor]:
    """What Megatron's router needs from a CPU-only torch — a 'current device' for its buffers
    and gate weight, no Transformer-Engine GEMM, an aux-loss gradient scale of 1 — applied with
    ``setattr_`` (pytest's ``monkeypatch.setattr`` to undo it, or plain ``setattr`` in a
    spawned process). Returns the list every aux loss handed to ``MoEAuxLossAutoScaler`` (the
    value Megatron backpropagates) is appended to."""
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe import router as mcore_router

    setattr_(torch.cuda, "current_device", lambda: "cpu")
    setattr_(moe_utils, "te_general_gemm", None)  # undefined without Transformer Engine
    scaler = moe_utils.MoEAuxLossAutoScaler
    setattr_(scaler, "main_loss_backward_scale", torch.tensor(1.0))
    recorded: list[torch.Tensor] = []

    class Recording:
        @staticmethod
        def apply(activation: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
            recorded.append(aux_loss.detach().clone())
            return scaler.apply(activation, aux_loss)

    setattr_(mcore_router, "MoEAuxLossAutoScaler", Recording)
    return recorded


def global_aux_router(
    dims: tuple[int, int, int, int],
    coeff: float,
    tp: dist.ProcessGroup,
    tp_dp_cp: dist.ProcessGroup,
):
    """Megatron's softmax ``TopKRouter`` with ``global_aux_loss`` (``dims`` = D, E, F, K; fp32,
    no bias); ``tp`` serves as its tensor, context and tensor-context group, ``tp_dp_cp`` is the
    group its counts are summed over."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    D, E, F, K = dims
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=D,
        num_attention_heads=1,
        num_moe_experts=E,
        moe_ffn_hidden_size=F,
        moe_router_topk=K,
        moe_aux_loss_coeff=coeff,
        moe_router_load_balancing_type="global_aux_loss",
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        add_bias_linear=False,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    pgs = ProcessGroupCollection(tp=tp, cp=tp, tp_cp=tp, tp_dp_cp=tp_dp_cp)
    router = TopKRouter(cfg, pg_collection=pgs)
    router.set_layer_number(1)  # else the loss tracker records nothing
    return router.train()


def moetrain_layer(
    dims: tuple[int, int, int, int], coeff: float, scope: str, weight_ED: torch.Tensor
) -> MoELayer:
    """A moetrain layer (``dims`` = D, E, F, K) routing with ``weight_ED``, aux loss only."""
    D, E, F, K = dims
    cfg = MoEConfig(
        num_experts=E,
        top_k=K,
        dim=D,
        hidden_dim=F,
        aux_loss_coeff=coeff,
        aux_loss_scope=scope,
        z_loss_coeff=0.0,
    )
    layer = MoELayer(cfg)
    router = layer.router
    assert isinstance(router, TopKRouter)
    with torch.no_grad():
        router.weight_ED.copy_(weight_ED)
    return layer.train()


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
    """One micro-batch through the layer: its aux loss and the router-weight gradient of the
    aux loss alone (zero upstream gradient on the output)."""
    layer.router.weight_ED.grad = None
    y = layer(x_BSD)
    y.backward(torch.zeros_like(y))
    assert layer.last_stats is not None and layer.router.weight_ED.grad is not None
    return layer.last_stats.aux_loss.item(), layer.router.weight_ED.grad.clone()


def topk_gap(weight_ED: torch.Tensor, x_BSD: torch.Tensor, k: int) -> float:
    """The smallest gap between the k-th and (k+1)-th softmax scores over the tokens: > 0
    means both implementations' top-k pick the same set."""
    scores = torch.softmax(x_BSD.reshape(-1, weight_ED.shape[1]) @ weight_ED.T, dim=-1)
    top = scores.topk(k + 1, dim=-1).values
    return float((top[:, k - 1] - top[:, k]).min())


def micro_batches(n: int, shape: tuple[int, int, int], seed: int) -> list[torch.Tensor]:
    """[B, S, D] inputs whose routing differs from micro-batch to micro-batch (each has its own
    mean direction), so running counts differ from each call's own counts."""
    g = torch.Generator().manual_seed(seed)
    D = shape[2]
    return [torch.randn(*shape, generator=g) + 1.5 * torch.randn(D, generator=g) for _ in range(n)]
