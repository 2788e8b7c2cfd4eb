"""``moetrain-train optim.lr=1e6 train.steps=20 checkpoint.interval=1`` diverges at step 2 (the
grad norm is NaN): the run must stop there with exit status 3 and one line naming the step and
the quantity, and ``latest`` must point at a checkpoint whose weights are all finite (before,
the run trained on to a NaN validation loss, saved NaN checkpoints and exited 0)."""

from __future__ import annotations

import subprocess

import pytest
import torch

import moetrain
from moetrain.testing.layouts import small_run_command, write_token_dir


@pytest.mark.timeout(240)
def test_divergence_stops_with_one_line_and_a_finite_latest(tmp_path):
    data_dir = write_token_dir(str(tmp_path / "tokens"))
    run_dir = tmp_path / "run"
    cmd = small_run_command(
        data_dir, run_dir, "optim.lr=1e6", "train.steps=20", "checkpoint.interval=1"
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 3, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moetrain-train:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "non-finite" in errors[0] and errors[0].startswith("moetrain-train: error: step ")
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(errors[0].split("step ")[1].split(":")[0])
    assert int(latest) == stopped_at - 1  # nothing saved at or after the bad step
    model = moetrain.load_model(run_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
