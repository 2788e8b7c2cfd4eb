"""Runs of the training app that check what it writes besides the metrics: the run report over
the whole run (one step; resumed after a rewind), the TensorBoard scalars, and the profiler's
trace of ``train.profile_steps`` with the MoE phases as named ranges."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from moetrain.report import history, png
from moetrain.train.cli import compose_config, setup

SMOKE = ["experiment=smoke", "logging.wandb.mode=disabled"]
MOE_RANGES = {"moe/router", "moe/dispatcher", "moe/dispatch", "moe/experts", "moe/combine"}


def train(run_dir: Path, *overrides: str):
    cfg = compose_config([*SMOKE, f"run.dir={run_dir}", *overrides])
    _, _, trainer = setup(cfg)
    return trainer.run()


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.timeout(240)
def test_one_step_run_reports_its_step(tmp_path):
    run_dir = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # was: identical xlims, a blank heatmap
        train(run_dir, "train.steps=1")
    steps, shares = history.expert_load(history.read_history(run_dir))
    assert steps.tolist() == [1] and shares.shape == (3, 1, 8)  # tiny: 3 MoE layers, 8 experts
    np.testing.assert_allclose(shares.sum(axis=2), 1.0, rtol=1e-5)
    drawn = png.ink(png.read_rgb(run_dir / "expert_load.png"))
    assert drawn.colours > 100 and drawn.non_white > 0.3
    assert 'src="data:image/png;base64,' in (run_dir / "report.html").read_text()


@pytest.mark.timeout(300)
def test_resumed_run_reports_both_parts_and_tensorboard_matches_metrics(tmp_path):
    """Part one runs steps 1..4 (checkpoints at 2 and 4); part two resumes from step 2 and
    redoes 3..4: the report and TensorBoard hold steps 1..4 once each, 3..4 the second's."""
    run_dir = tmp_path / "run"
    common = ["train.steps=4", "train.log_interval=1", "logging.tensorboard=true"]
    train(run_dir, *common, "checkpoint.interval=2")
    first = {r["step"]: r for r in rows(run_dir) if "loss" in r}
    train(run_dir, *common, f"checkpoint.resume={run_dir / 'checkpoints' / '00000002'}")
    final = rows(run_dir)
    train_rows = {r["step"]: r for r in final if "loss" in r}
    assert sorted(train_rows) == [1, 2, 3, 4] and len(final) == 4 + 3  # val at 0, 3, 4
    assert train_rows[2] == first[2]  # part one's
    assert train_rows[4]["tokens_per_s"] != first[4]["tokens_per_s"]  # part two's (timed)
    steps, shares = history.expert_load(history.read_history(run_dir))
    assert steps.tolist() == [1, 2, 3, 4]
    for i, step in enumerate(steps):
        np.testing.assert_array_equal(shares[:, i], train_rows[step]["expert_load"])
    assert "1 .. 4" in (run_dir / "report.html").read_text()
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert scalars["loss"] == pytest.approx({s: r["loss"] for s, r in train_rows.items()})
    assert scalars["tokens_per_s"] == pytest.approx(
        {s: r["tokens_per_s"] for s, r in train_rows.items()}, rel=1e-6
    )
    assert scalars["val_loss"] == pytest.approx(
        {r["step"]: r["val_loss"] for r in final if "val_loss" in r}, rel=1e-6
    )
    assert scalars["expert_load/layer2/expert7"] == pytest.approx(
        {s: r["expert_load"][2][7] for s, r in train_rows.items()}, rel=1e-6
    )


@pytest.mark.timeout(240)
def test_profile_steps_trace_has_the_moe_ranges(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "train.steps=3", "train.profile_steps=[2,3]")
    traces = list((run_dir / "profile").iterdir())
    assert [t.name for t in traces] == ["rank0-steps2-3.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = [e.get("name") for e in events]
    assert {n for n in names if n in MOE_RANGES} == MOE_RANGES
    assert "train step 2" in names and "train step 3" in names and "train step 1" not in names
    # 3 MoE layers x 2 micro-batches x 2 steps
    assert names.count("moe/router") == 12 and names.count("moe/experts") == 12
