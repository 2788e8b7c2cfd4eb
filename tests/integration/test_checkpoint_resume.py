"""Resume is bit-exact on the same layout: a run killed (SIGKILL) after its step-12 checkpoint and
started again logs the same per-step losses as the uninterrupted run; a corrupted checkpoint is
skipped with a warning naming it; ``checkpoint.init_from`` loads weights only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from moetrain.checkpoint import find_latest, verify
from moetrain.testing.layouts import small_run_command, write_token_dir


def command(data_dir: str, run_dir: Path, *extra: str) -> list[str]:
    return small_run_command(
        data_dir, run_dir, "train.steps=20", "train.eval_interval=5", "optim.warmup_steps=3", *extra
    )


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_token_dir(str(tmp_path_factory.mktemp("tokens")))


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("full") / "run"
    proc = subprocess.run(
        command(data_dir, run_dir), env=env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.timeout(300)
def test_sigkill_after_step_12_then_resume_is_bit_exact(data_dir, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    cmd = command(data_dir, run_dir, "checkpoint.interval=4")
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = run_dir / "checkpoints" / "00000012"
    deadline = time.monotonic() + 200
    while not target.exists():
        assert proc.poll() is None, "the run ended before its step-12 checkpoint"
        assert time.monotonic() < deadline, "no step-12 checkpoint in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(step for step, _ in train_losses(run_dir))
    assert 12 <= killed_at < 20
    resumed = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "00000012" in resumed.stdout
    # every step logged once, the same losses bit for bit
    assert train_losses(run_dir) == train_losses(uninterrupted)
    val = [(r["step"], r["val_loss"]) for r in rows(run_dir) if "val_loss" in r]
    assert val == [(r["step"], r["val_loss"]) for r in rows(uninterrupted) if "val_loss" in r]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "00000020"
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == ["00000012", "00000016", "00000020"]  # keep_last=3


@pytest.mark.timeout(300)
def test_corrupt_newest_checkpoint_is_skipped(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    short = command(data_dir, run_dir, "checkpoint.interval=2", "train.steps=4")
    assert subprocess.run(short, env=env(), capture_output=True, timeout=240).returncode == 0
    newest = run_dir / "checkpoints" / "00000004"
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-7])  # truncated
    why = verify(newest)
    assert why is not None and shard.name in why and "checksum mismatch" in why
    with pytest.warns(UserWarning, match="00000004"):
        assert find_latest(run_dir / "checkpoints") == run_dir / "checkpoints" / "00000002"
    again = subprocess.run(
        [*short[:-1], "train.steps=6"], env=env(), capture_output=True, text=True, timeout=240
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "00000004" in again.stderr and "checksum mismatch" in again.stderr
    assert "resumed from" in again.stdout and "00000002" in again.stdout
    assert [s for s, _ in train_losses(run_dir)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.timeout(300)
def test_init_from_loads_weights_only(data_dir, uninterrupted, tmp_path):
    src = tmp_path / "src"
    short = command(data_dir, src, "checkpoint.interval=5", "train.steps=5")
    assert subprocess.run(short, env=env(), capture_output=True, timeout=240).returncode == 0
    ckpt = src / "checkpoints" / "00000005"
    fresh = tmp_path / "fresh"
    proc = subprocess.run(
        command(data_dir, fresh, f"checkpoint.init_from={ckpt}", "train.steps=2"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [s for s, _ in train_losses(fresh)]
    assert steps == [1, 2]  # a new run: step 1, fresh optimizer and schedule
    # its step-0 validation is the trained weights' (lower than the random init's)
    val0 = next(r["val_loss"] for r in rows(fresh) if r["step"] == 0 and "val_loss" in r)
    init0 = next(r["val_loss"] for r in rows(uninterrupted) if r["step"] == 0 and "val_loss" in r)
    val5 = next(r["val_loss"] for r in rows(src) if r["step"] == 5 and "val_loss" in r)
    assert val0 == val5 and val0 < init0
