"""The first hour with ``moetrain-train``: a run with default checkpoint settings leaves a
checkpoint it names in its last line, a resumed run's summary starts from the first run's
validation loss, and the output holds no torch warning or wandb footer."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from moetrain.testing.layouts import small_run_command, write_token_dir


def train(data_dir: str, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_SILENT", None)
    proc = subprocess.run(
        small_run_command(data_dir, run_dir, *overrides),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def summary(proc: subprocess.CompletedProcess) -> str:
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("moetrain: done")]
    return line


def first_val_loss(run_dir: Path) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["val_loss"] for r in rows if "val_loss" in r)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_token_dir(str(tmp_path_factory.mktemp("tokens")))


@pytest.mark.timeout(400)
def test_default_run_checkpoints_and_resume_summary_spans_both(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    first = train(data_dir, run_dir, "train.steps=2", "logging.wandb.mode=offline")
    ckpt = run_dir / "checkpoints" / "00000002"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert ckpt.is_dir()
    assert re.search(
        rf"moetrain: checkpoint saved: {re.escape(str(ckpt))} \(\d+\.\d\d s\)", first.stdout
    )
    assert f"; checkpoint {ckpt}; metrics in {run_dir}" in summary(first)
    both = first.stdout + first.stderr
    assert "torch.distributed is disabled" not in both  # torch's single-process warning
    assert "Run summary:" not in both and "Run history:" not in both  # wandb's footer
    initial = first_val_loss(run_dir)
    resumed = train(data_dir, run_dir, "train.steps=4")
    assert "resumed from" in resumed.stdout
    # the run's first validation (step 0, in the first process), not the resumed one's
    assert f"val loss {initial:.4f} -> " in summary(resumed)
    assert f"checkpoint {run_dir / 'checkpoints' / '00000004'}" in summary(resumed)


@pytest.mark.timeout(240)
def test_final_false_leaves_no_checkpoint(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(data_dir, run_dir, "train.steps=2", "checkpoint.final=false")
    assert not (run_dir / "checkpoints").exists()
    assert "checkpoint none saved (checkpoint.final=false)" in summary(proc)


@pytest.mark.timeout(240)
def test_resume_from_a_damaged_checkpoint_is_one_line(data_dir, tmp_path):
    """A checkpoint found damaged while the trainer loads it: one error line, exit 2, no
    traceback."""
    run_dir = tmp_path / "run"
    train(data_dir, run_dir, "train.steps=1")
    ckpt = run_dir / "checkpoints" / "00000001"
    victim = max(
        (p for p in ckpt.rglob("*") if p.is_file() and p.name != "checksums.json"),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = subprocess.run(
        small_run_command(
            data_dir, tmp_path / "again", "train.steps=2", f"checkpoint.resume={ckpt}"
        ),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("moetrain-train: error:")]
    assert "checkpoint.resume" in line and "checksum mismatch" in line
