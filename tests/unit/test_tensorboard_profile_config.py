"""TensorBoard's scalars from a row, and the start-up checks of ``logging.tensorboard`` and
``train.profile_steps``."""

from __future__ import annotations

import importlib.util

import pytest
from omegaconf import OmegaConf

from moetrain.config.schema import Config
from moetrain.config.validate import ConfigError, validate
from moetrain.train.cli import compose_config
from moetrain.train.tensorboard import scalar_fields


def config(*overrides: str) -> Config:
    cfg = OmegaConf.to_object(compose_config(["experiment=smoke", *overrides]))
    assert isinstance(cfg, Config)
    return cfg


def test_scalar_fields_are_the_numeric_values_with_lists_split():
    row = {
        "step": 4,
        "loss": 2.5,
        "skipped_steps": 1,
        "fssdp_materialized": True,
        "note": "text",
        "expert_load": [[0.75, 0.25], [0.5, 0.5]],
        "dead_experts": [0, 1],
        "dropped_frac_by_position": [0.0, 0.125],
    }
    assert scalar_fields(row) == {
        "loss": 2.5,
        "skipped_steps": 1.0,
        "expert_load/layer0/expert0": 0.75,
        "expert_load/layer0/expert1": 0.25,
        "expert_load/layer1/expert0": 0.5,
        "expert_load/layer1/expert1": 0.5,
        "dead_experts/0": 0.0,
        "dead_experts/1": 1.0,
        "dropped_frac_by_position/0": 0.0,
        "dropped_frac_by_position/1": 0.125,
    }


@pytest.mark.parametrize("steps", ["[2,3]", "[1,1]", "[6,6]", "null"])
def test_profile_steps_in_range_pass(steps):
    validate(config(f"train.profile_steps={steps}"))  # smoke: train.steps=6


@pytest.mark.parametrize("steps", ["[0,2]", "[3,2]", "[2,7]", "[2]", "[1,2,3]"])
def test_profile_steps_out_of_range_is_one_line(steps):
    with pytest.raises(ConfigError) as info:
        validate(config(f"train.profile_steps={steps}"))
    message = str(info.value)
    assert message.startswith("train.profile_steps: must be [first, last]") and "\n" not in message
    assert "<= train.steps (6)" in message


def test_tensorboard_without_the_package_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    with pytest.raises(ConfigError) as info:
        validate(config("logging.tensorboard=true"))
    assert str(info.value) == (
        "logging.tensorboard: needs the tensorboard package: pip install tensorboard"
    )
    validate(config("logging.tensorboard=false"))
