"""One-line start-up errors: Hydra's reports translated, checkpoint paths told apart, run dirs."""

from __future__ import annotations

import json
import os

import pytest

from moetrain.checkpoint.convert import main as convert_main
from moetrain.checkpoint.errors import CheckpointError
from moetrain.checkpoint.locate import locate
from moetrain.checkpoint.upcycle import main as upcycle_main
from moetrain.train import cli, startup


def compose_error(*overrides: str) -> str:
    with pytest.raises(startup.StartupError) as err:
        startup.compose_checked(list(overrides))
    return str(err.value)


def test_unknown_key_names_the_closest_key():
    assert compose_error("train.stepz=5") == "train.stepz: unknown key; did you mean train.steps?"
    assert "did you mean model.moe.top_k?" in compose_error("model.moe.top_kk=2")


def test_misspelled_preset_lists_the_group():
    line = compose_error("model=tiny_moe")
    assert line.startswith("model=tiny_moe: no such preset; model is one of deepseek_v3, ")
    assert "tiny_dense" in line and "\n" not in line


def test_wrong_type_and_malformed_override_are_one_line():
    assert compose_error("train.steps=abc").startswith("train.steps: Value 'abc'")
    assert compose_error("train.steps").startswith("train.steps: not an override")


def test_multirun_checks_each_sweep_s_first_value():
    assert startup.first_job_overrides(["a=1,2", "b=x", "+c=range(3,5)"]) == ["a=1", "b=x", "+c=3"]


def test_cli_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as code:
        cli.main(["model=tiny_moe"])
    assert code.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("moetrain-train: error: model=tiny_moe: no such preset")


def test_validate_only_checks_and_creates_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as code:
        cli.main(["--validate-only", f"run.dir={tmp_path / 'run'}"])
    assert code.value.code == 0 and not (tmp_path / "run").exists()


def run_dir_without_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")
    return run


@pytest.mark.parametrize("main", [convert_main, upcycle_main], ids=["convert", "upcycle"])
def test_from_a_run_without_checkpoints(tmp_path, capsys, main):
    run = run_dir_without_checkpoints(tmp_path)
    extra = ["--format", "native"] if main is convert_main else ["--mode", "copy"]
    args = ["--from", str(run), "--to", str(tmp_path / "out"), *extra]
    if main is upcycle_main:
        args += ["--num-experts", "4", "--top-k", "2"]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"error: --from: {run} is a run directory with no checkpoint" in line
    assert "checkpoint.resume" not in line and "incomplete" not in line


@pytest.mark.parametrize("main", [convert_main, upcycle_main], ids=["convert", "upcycle"])
def test_from_a_directory_that_is_no_checkpoint(tmp_path, capsys, main):
    extra = ["--format", "native"] if main is convert_main else ["--mode", "copy"]
    args = ["--from", str(tmp_path), "--to", str(tmp_path / "out"), *extra]
    if main is upcycle_main:
        args += ["--num-experts", "4", "--top-k", "2"]
    assert main(args) == 2
    line = capsys.readouterr().err.strip()
    assert f"--from: {tmp_path} is not a checkpoint" in line and "incomplete" not in line


def test_an_incomplete_save_is_called_one(tmp_path):
    step = tmp_path / "checkpoints" / "5"
    step.mkdir(parents=True)
    (step / "train_state.json").write_text(json.dumps({"step": 5}))
    with pytest.raises(CheckpointError, match=r"^--from: .*5: incomplete \(no checksums.json"):
        locate(step, "--from")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        locate(tmp_path, "--from")


def test_resume_from_a_run_dir_without_checkpoints_leaves_nothing(tmp_path, capsys):
    run = run_dir_without_checkpoints(tmp_path)
    new = tmp_path / "new"
    with pytest.raises(SystemExit) as code:
        cli.main([f"run.dir={new}", f"checkpoint.resume={run}"])
    assert code.value.code == 2 and not new.exists()
    assert "checkpoint.resume: " in capsys.readouterr().err


def test_resume_accepts_a_run_dir(tmp_path):
    step = tmp_path / "checkpoints" / "7"
    step.mkdir(parents=True)
    cfg = cli.compose_config([f"checkpoint.resume={tmp_path}"])
    with pytest.raises(CheckpointError, match="7: incomplete"):
        cli.checked(cfg)
    (step / "train_state.json").write_text("{}")
    (step / "checksums.json").write_text("{}")
    parsed, _ = cli.checked(cli.compose_config([f"checkpoint.resume={tmp_path}"]))
    assert parsed.checkpoint.resume == str(step)


def test_torchrun_run_dir_is_a_timestamp_shared_by_the_agent_s_ranks(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "3f2a9c1e-uuid")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    name = cli.default_run_dir().name
    assert "uuid" not in name and name.endswith(f"-{os.getppid()}")
    assert cli.default_run_dir() == cli.default_run_dir()
    monkeypatch.setenv("WORLD_SIZE", "4")  # several nodes: the shared rendezvous id
    assert cli.default_run_dir().name == "3f2a9c1e-uuid"
