"""The all-to-all dispatcher equals the single-process layer on the same micro-batches."""

from __future__ import annotations

import pytest
import torch

from moetrain.moe import MoEConfig, MoELayer
from moetrain.moe.experts import GroupedExperts
from moetrain.parallel.ep import AllToAllDispatcher
from moetrain.parallel.ep_comm import segment_order
from moetrain.testing import run_distributed

E, D, F, T = 8, 16, 32, 12
CASES = {
    "dropless": {},
    "capacity_probs": dict(capacity_factor=0.5),
    "capacity_position_padded": dict(
        capacity_factor=0.75, drop_policy="position", pad_to_capacity=True
    ),
    "sigmoid_shared": dict(score_func="sigmoid", num_shared_experts=1, shared_gate=True),
}


def micro_batches(world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(T, D, generator=gen) for _ in range(world)]
    gs = [torch.randn(T, D, generator=gen) for _ in range(world)]
    return xs, gs


def dense_params(layer: MoELayer) -> dict[str, torch.nn.Parameter]:
    """Parameters every rank holds whole (router, shared experts)."""
    return {n: p for n, p in layer.named_parameters() if not n.startswith("experts.")}


def reference(layer: MoELayer, xs, gs):
    """Single process: each rank's micro-batch in turn; expert grads accumulate over them, and
    each micro-batch's own contribution to the other parameters is recorded."""
    outs, x_grads, dense_grads = [], [], []
    layer.zero_grad()
    for x, g in zip(xs, gs):
        x = x.clone().requires_grad_(True)
        before = {
            n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in dense_params(layer).items()
        }
        y = layer(x)
        (y * g).sum().backward()
        outs.append(y.detach())
        x_grads.append(x.grad)
        dense_grads.append({n: p.grad - before[n] for n, p in dense_params(layer).items()})
    return outs, x_grads, dense_grads


def ep_matches(rank: int, world: int, case: str) -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, top_k=2, dim=D, hidden_dim=F, **CASES[case])
    full = MoELayer(cfg)
    xs, gs = micro_batches(world)
    ref_out, ref_xgrad, ref_dense = reference(full, xs, gs)

    layer = MoELayer(cfg)
    layer.load_state_dict(full.state_dict())
    layer.dispatcher = AllToAllDispatcher(E, group=None)
    local = layer.dispatcher.num_local
    mine = slice(rank * local, (rank + 1) * local)
    layer.experts = GroupedExperts(cfg, num_experts=local)
    with torch.no_grad():
        for name, p in layer.experts.named_parameters():
            p.copy_(getattr(full.experts, name)[mine])
    layer.zero_grad()
    x = xs[rank].clone().requires_grad_(True)
    y = layer(x)
    (y * gs[rank]).sum().backward()

    torch.testing.assert_close(y, ref_out[rank], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_xgrad[rank], rtol=1e-5, atol=1e-6)
    for name, p in dense_params(layer).items():
        torch.testing.assert_close(p.grad, ref_dense[rank][name], rtol=1e-5, atol=1e-6)
    for name, p in layer.experts.named_parameters():
        want = getattr(full.experts, name).grad[mine]
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", CASES)
def test_all_to_all_dispatcher_equals_single_process(case, world):
    run_distributed(ep_matches, world, case, timeout=90)


def test_segment_order_regroups_by_second_axis():
    # rows stored as source-major chunks: (s0,e0)=1 row, (s0,e1)=2, (s1,e0)=0, (s1,e1)=1
    counts = torch.tensor([[1, 2], [0, 1]])
    assert segment_order(counts).tolist() == [0, 1, 2, 3]
    counts = torch.tensor([[2, 1], [1, 2]])  # rows 0-1 (s0,e0), 2 (s0,e1), 3 (s1,e0), 4-5 (s1,e1)
    assert segment_order(counts).tolist() == [0, 1, 3, 2, 4, 5]
