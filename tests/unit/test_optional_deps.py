"""Where hydra-core, omegaconf or wandb are missing (an offline GPU image with only torch): the
library still imports, and the trainer runs with ``logging.wandb.mode=disabled``; any other
wandb mode fails with one line naming the setting and the fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moetrain.config.schema import Config
from moetrain.config.validate import ConfigError, validate
from moetrain.testing.layouts import layout_config, write_token_dir
from moetrain.testing.optional import blocker_source
from moetrain.train.tracking import Tracker
from moetrain.train.trainer import Trainer

# The library's layers: everything but the Hydra app (moetrain.train) and the test helpers.
LIBRARY = ["ops", "moe", "models", "parallel", "checkpoint", "data", "config", "report"]

BLOCKED_IMPORTS = blocker_source() + textwrap.dedent(
    """
    import importlib, pkgutil

    try:
        import omegaconf
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker let omegaconf through")
    import moetrain

    names = []
    for sub in sys.argv[1:]:
        pkg = importlib.import_module(f"moetrain.{sub}")
        names.append(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}."):
            importlib.import_module(info.name)
            names.append(info.name)
    leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print(len(names), "modules;", "leaked:", leaked)
    """
)


def test_the_library_imports_without_hydra_omegaconf_or_wandb():
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS, *LIBRARY],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, _, leaked = proc.stdout.strip().partition(" modules; leaked: ")
    assert int(count) > 50  # the walk reached every layer's modules, not just the packages
    assert leaked == "[]"


@pytest.fixture
def no_wandb(monkeypatch):
    """``import wandb`` raises ImportError, as where it is not installed."""
    monkeypatch.setitem(sys.modules, "wandb", None)


def test_disabled_tracker_needs_no_wandb(no_wandb, tmp_path):
    tracker = Tracker("disabled", "p", None, tmp_path, {"a": 1})
    tracker.log({"loss": 1.0, "expert_load": [[0.5, 0.5]]}, step=1)
    tracker.log_image("expert_load", tmp_path / "missing.png", step=1)
    tracker.finish()
    assert tracker.run is None and tracker.run_id is None


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_a_wandb_mode_without_wandb_is_one_line_naming_the_fix(no_wandb, tmp_path, mode):
    with pytest.raises(ImportError) as err:
        Tracker(mode, "p", None, tmp_path, {})
    message = str(err.value)
    assert "\n" not in message
    assert f"logging.wandb.mode={mode} needs wandb" in message
    assert "logging.wandb.mode=disabled" in message


def test_config_validation_names_the_wandb_setting_before_training(no_wandb):
    cfg = Config()  # the default mode is offline
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == (
        "logging.wandb.mode: is offline but wandb is not installed: set "
        "logging.wandb.mode=disabled, or pip install wandb"
    )
    cfg.logging.wandb.mode = "disabled"
    validate(cfg)


def test_config_accepts_offline_where_wandb_is_installed():
    pytest.importorskip("wandb")
    validate(Config())


def test_the_trainer_runs_without_wandb_when_it_is_disabled(no_wandb, tmp_path):
    data_dir = write_token_dir(str(tmp_path / "tokens"), num_tokens=20_000)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = layout_config(data_dir, ["train.steps=2", "train.eval_interval=0", f"run.dir={run_dir}"])
    assert cfg.logging.wandb.mode == "disabled"
    Trainer(cfg, run_dir).run()
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in rows if '"step"' in r]) >= 2
    assert sys.modules["wandb"] is None  # still hidden: nothing imported it another way
