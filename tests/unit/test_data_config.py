"""DataConfig: defaults, validation messages, and the Hydra YAMLs in moetrain/configs/data/."""

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moetrain.data.config import DataConfig

CONFIGS = Path(__file__).resolve().parents[2] / "moetrain" / "configs" / "data"


def test_defaults_are_valid():
    cfg = DataConfig()
    cfg.validate()
    assert (cfg.source, cfg.path, cfg.tokenizer, cfg.val_fraction) == ("stdlib", None, "byte", 0.05)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"source": "web"}, r"data\.source.*stdlib, tokens"),
        ({"val_fraction": 0.0}, r"data\.val_fraction.*\(0, 0\.5\]"),
        ({"val_fraction": 0.6}, r"data\.val_fraction"),
        ({"source": "tokens"}, r"data\.path.*required.*moetrain\.data\.prepare"),
    ],
)
def test_bad_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DataConfig(**kwargs)


def test_missing_path_names_setting_and_prepare(tmp_path):
    cfg = DataConfig(source="tokens", path=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"data\.path.*python -m moetrain\.data\.prepare"):
        cfg.validate()


def test_missing_tokenizer_file():
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer"):
        DataConfig(tokenizer="/no/such/tokenizer.json").validate()


@pytest.mark.parametrize("name", ["stdlib", "tokens", "mix"])
def test_yaml_matches_fields(name):
    raw = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert set(raw.keys()) == {f.name for f in dataclasses.fields(DataConfig)}
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), raw)
    assert merged.source == name
    if name == "tokens":
        assert OmegaConf.is_missing(raw, "path")
