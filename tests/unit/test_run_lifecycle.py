"""A run's life as a user sees it: the final checkpoint, trustworthy throughput numbers, the
peak FLOP/s and its record, ``run_meta.json``, and what the trainer announces."""

from __future__ import annotations

import json
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

from moetrain.testing.layouts import layout_config, write_token_dir
from moetrain.train import throughput
from moetrain.train.nonfinite import NonFiniteError
from moetrain.train.run_meta import git_commit, val_history
from moetrain.train.throughput import (
    ThroughputWindow,
    interval_rate,
    model_flops_utilization,
    peak_flops_per_device,
)
from moetrain.train.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_token_dir(str(tmp_path_factory.mktemp("tokens")))


def trainer(data_dir: str, run_dir: Path, *overrides: str) -> Trainer:
    """The contract's tiny configuration, 2 steps, evaluated only at the start and the end."""
    cfg = layout_config(
        data_dir, ["train.steps=2", "train.eval_interval=0", f"run.dir={run_dir}", *overrides]
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, run_dir)


def saved_steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit())


# --- throughput ---------------------------------------------------------------------------------


def test_interval_rate_is_tokens_over_wall_time_less_excluded():
    assert interval_rate(1000, 10.0, 12.0) == 500.0
    assert interval_rate(1000, 10.0, 13.0, excluded=1.0) == 500.0
    assert interval_rate(0, 10.0, 12.0) == 0.0
    assert interval_rate(1000, 10.0, 10.0) == 0.0  # no time: no rate, no division by zero


def test_window_averages_every_step_since_the_last_row_and_skips_pauses():
    clock = iter([3.0, 4.5])  # the pause: from 3.0 to 4.5
    window = ThroughputWindow(0.0, clock=lambda: next(clock))
    for _ in range(3):
        window.add_step(100)
    with window.paused():  # an evaluation or a save
        pass
    # steps of 1 s, 1 s and 1.5 s plus a 1.5 s pause: 300 tokens over 3.5 s of training
    assert window.take(5.0) == pytest.approx(300 / 3.5)
    window.add_step(100)  # the next window starts at the row
    assert window.take(5.5) == pytest.approx(200.0)


def test_mfu_divides_by_the_launch_peak():
    assert model_flops_utilization(1000.0, 6e6, 1e10, world_size=2) == pytest.approx(0.3)
    assert model_flops_utilization(1000.0, 6e6, 0.0, world_size=1) == 0.0


def test_logged_tok_s_averages_the_log_interval(data_dir, tmp_path, monkeypatch):
    """Step 1 is slowed by 2 s; the row at step 3 (log_interval=3) counts it. Today's code
    reported step 3's own rate."""
    t = trainer(data_dir, tmp_path, "train.steps=3", "train.log_interval=3")
    real_step = t.train_step

    def slow_first_step():
        out = real_step()
        if t.step == 1:
            time.sleep(2.0)
        return out

    monkeypatch.setattr(t, "train_step", slow_first_step)
    t.run()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if "loss" in r]
    tokens = 3 * 8 * 32  # 3 steps x 8 sequences x 32 tokens
    assert row["step"] == 3 and row["tokens_per_s"] < tokens / 2.0
    assert row["mfu"] == pytest.approx(row["tokens_per_s"] * t.flops_per_token / 1e12)


# --- the peak ---------------------------------------------------------------------------------


def test_measured_peak_is_the_best_repetition_after_warmup(monkeypatch):
    calls = []
    real = throughput.gemm_rates

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(throughput, "gemm_rates", spy)
    peak = peak_flops_per_device(None, torch.device("cpu"), n=64, repeats=4, min_seconds=0.0)
    assert len(peak.samples) == 4 and peak.value == max(peak.samples) > 0
    assert peak.source.startswith("measured: best of 4 fp32 64^3")
    assert calls and calls[0]["repeats"] == 4
    meta = peak.as_meta()
    assert meta["peak_flops_per_device"] == peak.value
    assert meta["peak_flops_samples"] == peak.samples


def test_gemm_rates_repeat_until_the_time_budget():
    rates = throughput.gemm_rates(torch.device("cpu"), n=32, repeats=2, min_seconds=0.05)
    assert 2 < len(rates) <= 20


def test_configured_peak_is_not_measured():
    peak = peak_flops_per_device(2e12)
    assert (peak.value, peak.samples) == (2e12, [])
    assert "train.peak_flops_per_device" in peak.source


# --- run_meta.json ------------------------------------------------------------------------------


def test_git_commit_of_a_repository_and_none_elsewhere(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert git_commit(repo) == {"commit": head.strip(), "dirty": False}
    (repo / "f.txt").write_text("b")
    assert git_commit(repo) == {"commit": head.strip(), "dirty": True}
    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_commit(outside) is None
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no git at all
    assert git_commit(repo) is None


def test_run_meta_records_commit_command_layout_and_peak(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["moetrain-train", "train.steps=2"])
    t = trainer(data_dir, tmp_path, "train.peak_flops_per_device=null")
    t.run()
    meta = json.loads((tmp_path / "run_meta.json").read_text())
    assert meta["command"] == ["moetrain-train", "train.steps=2"]
    assert meta["git"] == git_commit()  # this checkout's commit (None outside a repository)
    layout = meta["layout"]
    assert layout["describe"] == "world 1 = pp 1 x dp_replicate 1 x dp_shard 1 x cp 1 x tp 1"
    assert layout["degrees"]["ep"] == 1 and layout["degrees"]["world_size"] == 1
    assert layout["experts"].startswith("ep 1")
    assert meta["peak_flops_source"].startswith("measured: best of")
    assert meta["peak_flops_per_device"] == max(meta["peak_flops_samples"]) > 0
    assert meta["resumed_from"] is None and meta["start_step"] == 0


# --- the final checkpoint and the announcements ---------------------------------------------------


def test_default_run_saves_a_final_checkpoint_and_says_so(data_dir, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer(data_dir, tmp_path).run()
    assert saved_steps(tmp_path) == ["00000002"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "00000002"
    assert result.checkpoint == tmp_path / "checkpoints" / "00000002"
    out = capsys.readouterr().out
    assert out.count("moetrain: checkpoint saved: ") == 1
    assert f"checkpoint saved: {result.checkpoint} (" in out and " s)" in out
    # torch's "torch.distributed is disabled ... single process" warning is silenced
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]


def test_final_false_saves_nothing(data_dir, tmp_path, capsys):
    result = trainer(data_dir, tmp_path, "checkpoint.final=false").run()
    assert not (tmp_path / "checkpoints").exists() and result.checkpoint is None
    assert "checkpoint saved" not in capsys.readouterr().out


def test_interval_save_at_the_last_step_is_not_repeated(data_dir, tmp_path, capsys):
    trainer(data_dir, tmp_path, "checkpoint.interval=1").run()
    assert saved_steps(tmp_path) == ["00000001", "00000002"]
    assert capsys.readouterr().out.count("checkpoint saved: ") == 2


def test_interval_with_final_false_saves_at_multiples_only(data_dir, tmp_path):
    trainer(
        data_dir, tmp_path, "train.steps=3", "checkpoint.interval=2", "checkpoint.final=false"
    ).run()
    assert saved_steps(tmp_path) == ["00000002"]


def test_nonfinite_stop_saves_no_final_checkpoint(data_dir, tmp_path):
    t = trainer(data_dir, tmp_path, "train.steps=6", "optim=adamw", "optim.lr=1e6")
    with pytest.raises(NonFiniteError):
        t.run()
    assert not (tmp_path / "checkpoints").exists()


def test_resume_reports_the_whole_runs_validation_and_init_from_is_announced(
    data_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    first = trainer(data_dir, run).run()
    resumed = trainer(data_dir, run, "train.steps=4").run()
    out = capsys.readouterr().out
    assert f"moetrain: resumed from {run / 'checkpoints' / '00000002'} (step 2, " in out
    assert [s for s, _ in resumed.val_losses] == [4]
    assert resumed.val_history[:2] == first.val_losses  # read back from metrics.jsonl
    assert [s for s, _ in resumed.val_history] == [0, 2, 4]
    assert resumed.checkpoint == run / "checkpoints" / "00000004"
    again = trainer(data_dir, run, "train.steps=4").run()  # nothing left to train
    out = capsys.readouterr().out
    assert "nothing to train: resumed at step 4 with train.steps=4" in out
    assert "checkpoint saved" not in out and again.checkpoint == resumed.checkpoint
    fresh = tmp_path / "fresh"
    trainer(data_dir, fresh, f"checkpoint.init_from={run}", "checkpoint.final=false")
    assert f"moetrain: weights loaded from {run} (checkpoint.init_from, " in capsys.readouterr().out


def test_val_history_reads_validation_rows_and_skips_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert val_history(path) == []
    rows = [{"step": 0, "val_loss": 5.0}, {"step": 1, "loss": 4.0}, {"step": 2, "val_loss": 3.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "val_lo')
    assert val_history(path) == [(0, 5.0), (2, 3.5)]
