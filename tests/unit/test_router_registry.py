"""The router registry: a router defined and registered here (one class, one line) runs in the
layer, is accepted by the config and is grouped by the optimizer like the built-in routers.

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from moetrain.config.schema import OptimConfig
from moetrain.moe import MoEConfig, MoELayer
from moetrain.moe.router import Router, RouterOutput
from moetrain.moe.router_registry import ROUTERS, build_router, register_router
from moetrain.moe.topk_router import TopKRouter
from moetrain.train.optim import parameter_groups


class FirstKRouter(Router):
    """Toy router: every token goes to experts 0..K-1, mixed by one learned softmax."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        self.gate_1K = nn.Parameter(torch.zeros(1, cfg.top_k))
        self.loads: list[Tensor] = []

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate_1K, std=std)

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> RouterOutput:
        T, K = x_TD.shape[0], self.cfg.top_k
        topk_ids_TK = torch.arange(K, device=x_TD.device).expand(T, K)
        weights_TK = torch.softmax(self.gate_1K.float(), dim=-1).expand(T, K)
        return RouterOutput(topk_ids_TK, weights_TK)

    def record_load(self, topk_ids_TK: Tensor) -> None:
        self.loads.append(topk_ids_TK)


@pytest.fixture
def first_k():
    register_router("first_k", FirstKRouter)
    yield "first_k"
    del ROUTERS["first_k"]


def test_registered_router_runs_in_the_layer(first_k):
    cfg = MoEConfig(num_experts=4, top_k=2, dim=8, hidden_dim=16, router_type=first_k)
    layer = MoELayer(cfg).train()
    assert isinstance(layer.router, FirstKRouter)
    x = torch.randn(2, 3, 8, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.last_stats is not None
    assert layer.last_stats.tokens_per_expert_E.tolist() == [6, 6, 0, 0]
    assert len(layer.router.loads) == 1  # the training call recorded its load
    assert layer.router.gate_1K.grad is not None and layer.router.gate_1K.grad.abs().sum() > 0
    assert x.grad is not None and layer.experts.w1_EFD.grad is not None
    assert layer.update_expert_bias() is None  # the base hook: no balancing
    layer.eval()(x)
    assert len(layer.router.loads) == 1  # evaluation records nothing


def test_registered_router_is_a_config_choice(first_k):
    with pytest.raises(ValueError, match=r"model\.moe\.router_type: must be one of .*first_k"):
        MoEConfig(router_type="nope")
    with pytest.raises(ValueError, match=r"model\.moe\.bias_update_rate.*'learned' only"):
        MoEConfig(router_type=first_k, bias_update_rate=1e-3)
    assert type(build_router(MoEConfig(router_type=first_k))) is FirstKRouter


def test_router_parameters_skip_weight_decay(first_k):
    cfg = MoEConfig(num_experts=4, top_k=2, dim=8, hidden_dim=16, router_type=first_k)
    layer = MoELayer(cfg)
    groups = {g["name"]: g["params"] for g in parameter_groups(layer, OptimConfig())}
    assert any(p is layer.router.gate_1K for p in groups["no_decay"])


def test_a_name_is_registered_once(first_k):
    register_router(first_k, FirstKRouter)  # the same class again: no change
    with pytest.raises(ValueError, match="already registered"):
        register_router(first_k, TopKRouter)
    assert ROUTERS[first_k] is FirstKRouter
