"""Every host sync on the MoE layer's forward and backward, named and counted.

The layer runs on the CPU under ``HostSyncCounter``, which treats its input and parameters as
device tensors (moetrain/testing/host_syncs.py). A new sync anywhere on the path changes a
table below and fails the test; docs/moe.md ("Host syncs") explains each entry.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from moetrain.moe.config import MoEConfig
from moetrain.moe.layer import MoELayer
from moetrain.ops import reference_kernels
from moetrain.testing.host_syncs import HostSyncCounter, describe

LOOP_SPLITS = ("moetrain.moe.experts:loop_mlp", "tolist")
KEPT_ROWS = ("moetrain.moe.dispatcher:expert_rows", "tolist")

# config -> the syncs of one forward + backward, per implementation of the experts
CASES = {
    "dropless": ({}, {"grouped_mm": [], "loop": [LOOP_SPLITS]}),
    "capacity": (
        dict(capacity_factor=0.5, min_capacity=0),
        {"grouped_mm": [KEPT_ROWS], "loop": [KEPT_ROWS]},  # the loop reuses the host counts
    ),
    "padded": (
        dict(capacity_factor=0.5, min_capacity=0, pad_to_capacity=True),
        {"grouped_mm": [], "loop": []},  # every expert has C rows: known on the host
    ),
    "router_options": (
        dict(score_func="sigmoid", z_loss_coeff=0.01, aux_loss_scope="global", num_groups=2),
        {"grouped_mm": [], "loop": [LOOP_SPLITS]},
    ),
    "bias_balancing_kept": (
        dict(
            capacity_factor=0.5,
            min_capacity=0,
            bias_update_rate=1e-3,
            bias_load="kept",
            aux_loss_coeff=0.0,
        ),
        {"grouped_mm": [KEPT_ROWS], "loop": [KEPT_ROWS]},
    ),
    "shared_experts": (
        dict(num_shared_experts=1, shared_gate=True),
        {"grouped_mm": [], "loop": [LOOP_SPLITS]},
    ),
    # routing research: non-FFN and inactive slots are masked out like dropped ones, so the
    # kept-row count is read once (the loop reuses it); expert-choice has fixed shapes
    "null_and_zero_compute_experts": (
        dict(num_null_experts=2, num_copy_experts=1, num_constant_experts=1, gating_residual=True),
        {"grouped_mm": [KEPT_ROWS], "loop": [KEPT_ROWS]},
    ),
    "top_p": (dict(top_p=0.5, max_k=3), {"grouped_mm": [KEPT_ROWS], "loop": [KEPT_ROWS]}),
    "expert_choice": (
        dict(expert_choice="sequence", capacity_factor=1.0),
        {"grouped_mm": [], "loop": []},
    ),
    # routing policies: rectified and filled-in slots are masks too; the schedules and the
    # adaptive coefficient keep their step state on the host or the device, never read back
    "rectify_adaptive": (
        dict(
            capacity_factor=0.5,
            min_capacity=0,
            expert_groups=2,
            rectify_intra_group=True,
            rectify_fill_in=True,
            adaptive_aux_smoothing=0.9,
        ),
        {"grouped_mm": [KEPT_ROWS], "loop": [KEPT_ROWS]},
    ),
    "node_limited_locality": (
        dict(num_node_groups=2, max_node_groups=1, locality_bias=0.1),
        {"grouped_mm": [], "loop": [LOOP_SPLITS]},
    ),
    "dense_to_sparse": (
        dict(dense_to_sparse_steps=4),
        {"grouped_mm": [KEPT_ROWS], "loop": [KEPT_ROWS]},
    ),
    "top_k_schedule": (
        dict(top_k_schedule_steps=4, freeze_router=True),
        {"grouped_mm": [KEPT_ROWS], "loop": [KEPT_ROWS]},
    ),
}


def layer_syncs(overrides: dict, impl: str, shape=(2, 8, 16)) -> HostSyncCounter:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, dim=16, hidden_dim=8, experts_impl=impl, **overrides)
    layer = MoELayer(cfg)
    layer.train()
    x = torch.randn(*shape, requires_grad=True)
    with HostSyncCounter([layer, x]) as syncs:
        y = layer(x)
        (y * y).sum().backward()
    return syncs


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_host_syncs_are_the_named_ones(case, impl):
    overrides, expected = CASES[case]
    syncs = layer_syncs(overrides, impl)
    assert syncs.counts() == Counter(expected[impl]), describe(syncs)


@pytest.mark.parametrize("case", ["dropless", "padded"])
def test_reference_kernels_add_no_sync(case):
    """The pure-torch fallback of the csrc ops (what runs when the extension is not built) is
    as sync-free as the kernels."""
    overrides, expected = CASES[case]
    with reference_kernels():
        syncs = layer_syncs(overrides, "grouped_mm")
    assert syncs.counts() == Counter(expected["grouped_mm"]), describe(syncs)


# --- the instrument itself ---------------------------------------------------------------


def test_counter_sees_reads_of_device_data_and_nothing_else():
    dev = torch.arange(6)
    with HostSyncCounter([dev]) as syncs:
        derived = dev * 2  # computed from device data: on the device
        host = torch.tensor([1, 2, 3])  # made on the host
        host.tolist()
        int(host.sum())
        derived.tolist()
        bool(derived.any())
        derived[derived > 4]  # boolean indexing: its shape is read on the host
        torch.nonzero(derived)
        copy = derived.cpu()
        copy.tolist()  # the host copy: free
        torch.repeat_interleave(torch.arange(6), derived)
        torch.repeat_interleave(torch.arange(6), derived, output_size=30)
    kinds = Counter(e.kind for e in syncs.events)
    assert kinds == Counter(
        {
            "tolist": 1,
            "bool": 1,
            "aten::index": 1,
            "aten::nonzero": 1,
            "cpu": 1,
            "aten::repeat_interleave (no output_size)": 1,
        }
    ), describe(syncs)


def test_counter_names_the_moetrain_function():
    from moetrain.moe.experts import loop_mlp

    counts = torch.tensor([1, 2])
    with HostSyncCounter([counts]) as syncs:
        x = torch.randn(3, 4)
        w = torch.randn(2, 5, 4)
        loop_mlp(x, counts, w, None, torch.randn(2, 4, 5))
    assert syncs.counts() == Counter([LOOP_SPLITS])


def test_counter_restores_tensor_methods():
    original = torch.Tensor.tolist
    with HostSyncCounter([]):
        assert torch.Tensor.tolist is not original
    assert torch.Tensor.tolist is original
