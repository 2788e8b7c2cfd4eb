"""tools/ablate_routing.py end to end on a few steps: one row per option, each computed from its
run (widths, drops, validation loss), the table and JSON written beside the runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "ablate_routing.py"
# no peak-FLOP/s measurement at each run's start, one validation batch
FAST = [
    "train.peak_flops_per_device=1e12",
    "train.eval_batches=1",
    "logging.progress_bar=false",
    "train.log_interval=1",  # every step's row: the schedule's first step too
]


@pytest.mark.timeout(240)
def test_ablation_rows_measure_each_option(tmp_path):
    out = tmp_path / "abl"
    args = ["--steps", "2", "--batch", "4", "--seq-len", "16", "--out", str(out), "--json"]
    options = "baseline,capacity,null_experts,expert_choice,rectify,top_k_schedule,locality"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--options", options, *args, *FAST],
        capture_output=True,
        text=True,
        timeout=220,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["option"]: r for r in result["rows"]}
    assert list(rows) == [*options.split(","), "baseline_seed+1"]
    assert result["tokens_per_step"] == 64 and result["steps"] == 2
    base = rows["baseline"]
    assert base["experts_per_token"] == base["ffn_experts_per_token"] == 2.0
    assert base["dropped_frac"] == 0 and base["unrouted_frac"] == 0
    assert rows["capacity"]["dropped_frac"] > 0  # capacity factor 1.0 on a fresh router
    null = rows["null_experts"]  # top-3 over 8 FFN + 4 null: 3 slots, fewer FFN experts
    assert null["experts_per_token"] == 3.0 and null["ffn_experts_per_token"] < 3.0
    ec = rows["expert_choice"]  # every expert takes ceil(16 * 2 / 8) = 4 tokens per sequence
    assert ec["ffn_experts_per_token"] == 2.0 and ec["dropped_frac"] == 0
    # intra-group rectification moves dropped slots to experts with room
    assert rows["rectify"]["dropped_frac"] < rows["capacity"]["dropped_frac"]
    assert rows["top_k_schedule"]["experts_per_token"] < 2.0  # k = 1 for the first step
    # ep2 over 2 simulated nodes under torchrun: its own run, node-limited routing's width
    assert rows["locality"]["experts_per_token"] == 2.0
    assert rows["locality"]["val_loss"] not in (base["val_loss"], rows["capacity"]["val_loss"])
    assert rows["baseline_seed+1"]["val_loss"] != base["val_loss"]
    assert all(r["tokens_per_s"] > 0 and r["val_loss"] > 0 for r in rows.values())
    table = (out / "ablation.md").read_text()
    assert table.count("\n| ") == 1 + len(rows)  # the header and one line per row
    assert json.loads((out / "ablation.json").read_text()) == result
    refused = subprocess.run(
        [sys.executable, str(TOOL), "--options", "bogus", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "--options: choose from baseline" in refused.stderr
