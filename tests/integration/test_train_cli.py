"""End-to-end runs of the training app: the CLI, determinism, and the errors a user can cause."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from moetrain.testing.layouts import small_run_command, write_token_dir
from moetrain.train.cli import compose_config, setup

SMOKE = ["experiment=smoke"]


def run_in_process(tmp_path: Path, *overrides: str):
    cfg = compose_config([*SMOKE, f"run.dir={tmp_path}", *overrides])
    _, run_dir, trainer = setup(cfg)
    return trainer.run(), run_dir


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, "-m", "moetrain.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.timeout(240)
def test_cli_trains_and_writes_metrics_and_heatmap(tmp_path):
    proc = run_cli(
        *SMOKE,
        f"run.dir={tmp_path / 'run'}",
        "logging.wandb.mode=offline",
        "train.deterministic=true",  # process-global torch flag: set only in a subprocess
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    rows = read_rows(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    keys = {
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "aux_loss",
        "z_loss",
        "dropped_frac",
        "expert_load",
        "dead_experts",
        "router_entropy",
    }
    assert keys <= set(train_rows[0])
    assert len(train_rows[0]["expert_load"]) == 3  # tiny: 4 layers, the first dense
    assert all(abs(sum(shares) - 1) < 1e-5 for shares in train_rows[0]["expert_load"])
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3, 6]
    assert (run_dir / "expert_load.png").stat().st_size > 1000
    assert (run_dir / "config.yaml").exists()
    meta = json.loads((run_dir / "run_meta.json").read_text())
    assert meta["python"] and meta["data"]
    assert any((run_dir / "wandb").glob("offline-run-*")), "wandb offline run missing"
    assert "ops backend" in proc.stdout
    assert not list(tmp_path.glob("*.log")), "the CLI must not litter the working directory"


@pytest.mark.timeout(240)
def test_same_seed_same_losses(tmp_path):
    first, _ = run_in_process(tmp_path / "a")
    second, _ = run_in_process(tmp_path / "b")
    assert first.losses == second.losses
    other, _ = run_in_process(tmp_path / "c", "train.seed=1")
    assert other.losses != first.losses


def expect_setup_error(tmp_path: Path, overrides: list[str], *fragments: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        setup(compose_config([*SMOKE, f"run.dir={tmp_path}", *overrides]))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_top_k_above_experts(tmp_path):
    expect_setup_error(tmp_path, ["model.moe.top_k=9"], "model.moe.top_k", "num_experts=8")


def test_missing_data_path(tmp_path):
    expect_setup_error(
        tmp_path,
        ["data=tokens", f"data.path={tmp_path / 'nope'}"],
        "data.path",
        "moetrain.data.prepare",
    )


def test_steps_not_positive(tmp_path):
    expect_setup_error(tmp_path, ["train.steps=0"], "train.steps", "> 0")


def test_global_batch_not_divisible(tmp_path):
    expect_setup_error(
        tmp_path, ["train.global_batch_size=5"], "train.global_batch_size", "train.micro_batch_size"
    )


def test_token_ids_past_vocab(tmp_path):
    data_dir = tmp_path / "tokens"
    data_dir.mkdir()
    tokens = np.arange(0, 4096, dtype=np.uint16) % 1000  # ids up to 999 > vocab 384
    tokens.tofile(data_dir / "tokens.bin")
    (data_dir / "meta.json").write_text(
        json.dumps(
            {
                "format": 1,
                "dtype": "uint16",
                "num_tokens": len(tokens),
                "num_documents": 1,
                "vocab_size": 259,
                "tokenizer": "byte",
                "eos_id": 257,
            }
        )
    )
    expect_setup_error(tmp_path, ["data=tokens", f"data.path={data_dir}"], "model.vocab_size")


@pytest.mark.parametrize(
    "override,setting",
    [("train.no_such_key=1", "train.no_such_key"), ("train.steps=many", "train.steps")],
    ids=["unknown_key", "wrong_type"],
)
def test_schema_rejects(tmp_path, override, setting):
    with pytest.raises(ConfigCompositionException, match=re.escape(setting)):
        compose_config([*SMOKE, override])
    proc = run_cli(override, cwd=tmp_path)
    assert proc.returncode != 0
    assert setting in proc.stderr and "Traceback" not in proc.stderr


def test_setup_error_is_one_line_on_the_cli(tmp_path):
    proc = run_cli(*SMOKE, f"run.dir={tmp_path}", "model.moe.top_k=9", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("moetrain-train: error: model.moe.top_k")
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(240)
def test_bf16_sgd_wsd_run_trains(tmp_path):
    result, _ = run_in_process(
        tmp_path, "train.dtype=bf16", "optim=sgd", "optim.schedule=wsd", "train.steps=8"
    )
    assert len(result.losses) == 8 and all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0]
    assert [s for s, _ in result.val_losses] == [0, 3, 6, 8]


def test_existing_run_dir_is_not_overwritten(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    expect_setup_error(tmp_path, [], "run.dir", "already holds a run")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.timeout(300)
@pytest.mark.parametrize("run_dir_set", [True, False], ids=["run_dir", "default_dir"])
def test_multirun_gives_each_job_its_own_run_dir(tmp_path, run_dir_set):
    data_dir = write_token_dir(str(tmp_path / "tokens"))
    sweep = tmp_path / "sweep"
    cmd = small_run_command(data_dir, sweep, "train.steps=1,2")
    cmd.insert(cmd.index("moetrain.train") + 1, "-m")  # Hydra's flags precede the overrides
    if not run_dir_set:
        cmd.append("run.dir=null")  # later overrides win: each job gets a default dir
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if not run_dir_set:
        (sweep,) = (tmp_path / "runs").iterdir()  # one default dir for the whole sweep
    assert (sweep / "multirun.yaml").exists()
    for job, steps in [(0, [1]), (1, [1, 2])]:
        job_dir = sweep / str(job)
        assert [r["step"] for r in read_rows(job_dir) if "loss" in r] == steps
        saved = OmegaConf.load(job_dir / "config.yaml")
        assert (tmp_path / saved.run.dir).resolve() == job_dir.resolve()  # relative to cwd
    assert {p.name for p in tmp_path.iterdir()} == {"tokens", "sweep" if run_dir_set else "runs"}


@pytest.mark.parametrize("override", ["+train.stepz=5", "++train.stepz=5"], ids=["add", "force"])
def test_appended_unknown_key_is_a_one_line_error(tmp_path, override):
    proc = run_cli(*SMOKE, f"run.dir={tmp_path / 'run'}", override, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("moetrain-train: error: train.stepz: unknown key")
    assert "did you mean train.steps?" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def warning_lines(capsys) -> list[str]:
    return [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("moetrain-train: warning:")
    ]


@pytest.mark.timeout(240)
def test_setup_warns_once_of_a_setting_without_effect(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    *_, trainer = setup(compose_config([*SMOKE, f"run.dir={tmp_path / 'a'}"]))
    trainer.close()
    assert warning_lines(capsys) == []  # the default config: no warning
    overrides = ["parallel.pp_schedule=gpipe", "model.moe.drop_policy=position"]
    *_, trainer = setup(compose_config([*SMOKE, f"run.dir={tmp_path / 'b'}", *overrides]))
    trainer.close()
    lines = warning_lines(capsys)
    assert len(lines) == 2
    assert "parallel.pp_schedule=gpipe has no effect" in lines[0]
    assert "model.moe.drop_policy=position has no effect" in lines[1]


def test_unused_choice_is_still_checked(tmp_path):
    expect_setup_error(
        tmp_path, ["parallel.pp_schedule=bogus"], "parallel.pp_schedule", "1f1b, gpipe"
    )
