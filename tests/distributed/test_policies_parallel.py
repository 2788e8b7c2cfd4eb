"""Routing research II under expert parallelism: three SGD steps of ``tiny`` with each routing
policy at ep2 and ep4 equal the single process on the same micro-batches (losses, grad norms,
aux/z-losses, validation loss, final weights, adaptive coefficients included).

The option sets: Rectify-Router (intra-group over groups of 2 experts, which lie on one EP rank
at ep2 and ep4, and fill-in) with adaptive aux coefficients (whose drop rate sums every
rank's counts) and the sequence aux scope; the dense-to-sparse gate (two dense steps with
Gumbel noise, then sparse); the top-k schedule (k = 1, 2, then 3) with a frozen router and a
capacity that follows k.
"""

from __future__ import annotations

import pytest

from moetrain.testing import run_distributed
from moetrain.testing.layouts import (
    assert_each_matches,
    train_steps,
    train_steps_each_rank,
    write_token_dir,
)

OPTIONS = {
    "rectify_adaptive_aux": [
        "model.moe.capacity_factor=1.0",
        "model.moe.expert_groups=2",
        "model.moe.rectify_intra_group=true",
        "model.moe.rectify_fill_in=true",
        "model.moe.adaptive_aux_smoothing=0.5",
        "model.moe.adaptive_aux_sensitivity=1.0",
        "model.moe.aux_loss_scope=sequence",
    ],
    "dense_to_sparse": [
        "model.moe.dense_to_sparse_steps=2",
        "model.moe.dense_to_sparse_threshold=0.1",
    ],
    "top_k_schedule_frozen": [
        "model.moe.top_k=3",
        "model.moe.top_k_schedule_steps=2",
        "model.moe.top_k_start=1",
        "model.moe.freeze_router=true",
        "model.moe.capacity_factor=1.25",
    ],
}
LAYOUTS = {"ep2": (2, ["parallel.ep=2"]), "ep4": (4, ["parallel.ep=4"])}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_token_dir(str(tmp_path_factory.mktemp("tokens")))


_references: dict[str, dict] = {}


def reference(data_dir: str, option: str) -> dict:
    if option not in _references:
        _references[option] = train_steps(data_dir, OPTIONS.get(option, []))
    return _references[option]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_changes_the_run(option, data_dir):
    """Every row below compares a run the option changed (so a row can fail)."""
    got, plain = reference(data_dir, option), reference(data_dir, "plain")
    assert got["loss"][1:] != pytest.approx(plain["loss"][1:], rel=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_options_at_layout_equal_single_process(layout, data_dir):
    """One launch per layout runs every option in turn."""
    world, overrides = LAYOUTS[layout]
    runs = [[*keys, *overrides] for keys in OPTIONS.values()]
    per_rank = run_distributed(train_steps_each_rank, world, data_dir, runs, 3, timeout=280)
    assert_each_matches(per_rank, {o: reference(data_dir, o) for o in OPTIONS}, layout)
