"""experts_impl=grouped_mm under expert parallelism (flat, overlapped chunks, hierarchical) and
FSSDP equals the single-process layer running the per-expert loop, and makes exactly the named
host syncs (one count exchange per layer call: the gradient exchanges reuse its split sizes).

Each rank runs its own micro-batch; the reference is one process running every rank's
micro-batch in turn with ``experts_impl=loop`` and the same weights. Tolerance rtol/atol 1e-5
(the layer tests' fp32 tolerance: grouped_mm and the loop sum the same products in another
order).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh

from moetrain.moe import MoEConfig, MoELayer
from moetrain.moe.experts import GroupedExperts
from moetrain.parallel.ep import AllToAllDispatcher
from moetrain.parallel.ep_comm import HierarchicalAllToAll, build_node_groups
from moetrain.parallel.fssdp import apply_fssdp
from moetrain.testing import run_distributed
from moetrain.testing.host_syncs import HostSyncCounter

E, D, F, K, T = 8, 16, 8, 2, 12
LAYER = {
    "dropless": {},
    "capacity": dict(capacity_factor=0.5, min_capacity=0),
    "padded": dict(capacity_factor=0.5, min_capacity=0, pad_to_capacity=True),
}
# case -> (layer options, how the experts are spread)
CASES = {
    "ep_dropless": ("dropless", "ep"),
    "ep_capacity": ("capacity", "ep"),
    "ep_padded": ("padded", "ep"),
    "ep_overlap3_dropless": ("dropless", "ep_overlap3"),
    "ep_overlap3_capacity": ("capacity", "ep_overlap3"),
    "ep_hierarchical_capacity": ("capacity", "ep_hierarchical"),
    "fssdp_dropless": ("dropless", "fssdp"),
    "fssdp_capacity": ("capacity", "fssdp"),
}
COUNTS = ("moetrain.parallel.ep_comm:exchange_counts", "cpu")
FSSDP_COUNTS = ("moetrain.parallel.fssdp:plan", "cpu")
# the one host sync per layer call (forward + backward), by how the experts are spread
EXPECTED_SYNCS = {
    "ep": [COUNTS],
    "ep_overlap3": [COUNTS],
    "ep_hierarchical": [COUNTS],
    "fssdp": [FSSDP_COUNTS],
}


def config(layer: str, impl: str) -> MoEConfig:
    return MoEConfig(num_experts=E, top_k=K, dim=D, hidden_dim=F, experts_impl=impl, **LAYER[layer])


def micro_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)


def forward_backward(layer: MoELayer, x, g, counter: HostSyncCounter | None = None):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    if counter is not None:
        counter.mark(layer)
        counter.mark(x)
        with counter:
            y = layer(x)
            (y * g).sum().backward()
    else:
        y = layer(x)
        (y * g).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def spread(layer: MoELayer, cfg: MoEConfig, full: MoELayer, how: str, rank: int, world: int):
    if how == "fssdp":
        apply_fssdp(layer, DeviceMesh("cpu", list(range(world))))
        return None
    comm = None
    if how == "ep_hierarchical":
        comm = HierarchicalAllToAll(build_node_groups([list(range(world))], world // 2), rank)
    chunks = 3 if how == "ep_overlap3" else 1
    layer.dispatcher = AllToAllDispatcher(E, group=None, overlap_chunks=chunks, comm=comm)
    local = E // world
    mine = slice(rank * local, (rank + 1) * local)
    layer.experts = GroupedExperts(cfg, num_experts=local)
    with torch.no_grad():
        for name, p in layer.experts.named_parameters():
            p.copy_(getattr(full.experts, name)[mine])
    return mine


def check_case(case: str, rank: int, world: int) -> list[tuple[str, str]]:
    layer_opts, how = CASES[case]
    torch.manual_seed(0)
    full = MoELayer(config(layer_opts, "loop"))
    full.reset_parameters(std=0.3)
    refs = [forward_backward(full, *micro_batch(r)) for r in range(world)]
    cfg = config(layer_opts, "grouped_mm")
    layer = MoELayer(cfg)
    layer.load_state_dict(full.state_dict())
    mine = spread(layer, cfg, full, how, rank, world)
    counter = HostSyncCounter()
    y, x_grad, grads = forward_backward(layer, *micro_batch(rank), counter)
    want_y, want_x, want_grads = refs[rank]
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, want_y, **close, msg=lambda m: f"{case} y: {m}")
    torch.testing.assert_close(x_grad, want_x, **close, msg=lambda m: f"{case} x.grad: {m}")
    for name, grad in grads.items():
        if name.startswith("experts."):
            continue  # summed over ranks' micro-batches: checked below
        want = want_grads[name]
        torch.testing.assert_close(grad, want, **close, msg=lambda m, n=name: f"{case} {n}: {m}")
    if mine is not None:  # EP: this rank's experts got gradients from every rank's tokens
        for name, p in layer.experts.named_parameters():
            total = sum(ref[2][f"experts.{name}"] for ref in refs)[mine]
            what = f"{case} {name}"
            torch.testing.assert_close(p.grad, total, **close, msg=lambda m, w=what: f"{w}: {m}")
    return [(e.site, e.kind) for e in counter.events]


def run_cases(rank: int, world: int, cases: list[str]) -> dict[str, Any]:
    return {case: check_case(case, rank, world) for case in cases}


def cases_for(world: int) -> list[str]:
    # the hierarchical exchange needs 2 "nodes" of at least 2 ranks; FSSDP's expert gradients
    # are checked by its own tests (the shards are F slices): here its outputs, inputs' and
    # router's gradients and its syncs
    return [c for c in CASES if world == 4 or CASES[c][1] != "ep_hierarchical"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_grouped_mm_under_ep_and_fssdp_equals_single_process_loop(world):
    cases = cases_for(world)
    per_rank = run_distributed(run_cases, world, cases, timeout=200)
    for rank, syncs in enumerate(per_rank):
        for case in cases:
            want = Counter(EXPECTED_SYNCS[CASES[case][1]])
            assert Counter(syncs[case]) == want, f"rank {rank}, {case}: {syncs[case]}"
