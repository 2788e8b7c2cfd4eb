"""ModelConfig validation, layer placement, and the presets in moetrain/configs/model (on meta)."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from moetrain.models import ModelConfig, Transformer
from moetrain.moe.config import MoEConfig

PRESETS = Path(__file__).resolve().parents[2] / "moetrain" / "configs" / "model"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_kv_heads=3), r"model\.num_kv_heads: 3 does not divide num_heads=4"),
        (dict(num_heads=3, num_kv_heads=1), r"model\.num_heads: 3 does not divide dim=128"),
        (dict(head_dim=0), r"model\.head_dim: must be a positive integer"),
        (dict(head_dim=15), r"model\.head_dim: must be even"),
        (dict(vocab_size=0), r"model\.vocab_size: must be a positive integer"),
        (dict(num_layers=-1), r"model\.num_layers: must be a positive integer"),
        (dict(dense_hidden_dim=0), r"model\.dense_hidden_dim"),
        (dict(max_seq_len=0), r"model\.max_seq_len"),
        (dict(moe_layer_freq=0), r"model\.moe_layer_freq"),
        (dict(first_k_dense=-1), r"model\.first_k_dense: must be an integer >= 0"),
        (dict(rope_theta=0.0), r"model\.rope_theta: must be > 0"),
        (dict(rope_scaling="ntk"), r"model\.rope_scaling: must be one of none, linear, yarn"),
        (
            dict(rope_scaling_factor=2.0),
            r"model\.rope_scaling_factor: is 2\.0 but model\.rope_scaling",
        ),
        (dict(rope_scaling="linear", rope_scaling_factor=0.0), r"model\.rope_scaling_factor"),
        (dict(rope_original_max_seq_len=0), r"model\.rope_original_max_seq_len"),
        (dict(yarn_beta_fast=1.0, yarn_beta_slow=2.0), r"model\.yarn_beta_fast"),
        (dict(qk_norm="layer"), r"model\.qk_norm: must be one of none, head, full"),
        (dict(sliding_window=0), r"model\.sliding_window: must be a positive integer or null"),
        (dict(norm_eps=0.0), r"model\.norm_eps"),
        (dict(init_std=0.0), r"model\.init_std"),
        (
            dict(dim=64),
            r"model\.moe\.dim \(128\) must equal model\.dim \(64\); "
            r"leave it to the interpolation \$\{model\.dim\}",
        ),
        (
            dict(moe=MoEConfig(aux_loss_coeff_per_layer=[0.1, 0.1])),
            r"model\.moe\.aux_loss_coeff_per_layer: has 2 entries but the model has 3 MoE layers",
        ),
    ],
)
def test_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_validate_can_run_again_after_edits():
    cfg = ModelConfig()
    cfg.num_kv_heads = 3
    with pytest.raises(ValueError, match=r"model\.num_kv_heads"):
        cfg.validate()


def test_head_dim_defaults_to_dim_over_heads():
    assert ModelConfig().head_size == 32
    assert ModelConfig(head_dim=48).head_size == 48


@pytest.mark.parametrize(
    ("first_k_dense", "freq", "num_layers", "moe_ids"),
    [(1, 1, 4, [1, 2, 3]), (0, 2, 5, [0, 2, 4]), (2, 3, 8, [2, 5]), (4, 1, 4, []), (9, 1, 4, [])],
)
def test_moe_layer_placement(first_k_dense, freq, num_layers, moe_ids):
    cfg = ModelConfig(first_k_dense=first_k_dense, moe_layer_freq=freq, num_layers=num_layers)
    assert [i for i in range(num_layers) if cfg.is_moe_layer(i)] == moe_ids
    assert cfg.num_moe_layers == len(moe_ids)


def load_preset(name: str) -> ModelConfig:
    """As Hydra composes it: the group file under ``model``, typed by the dataclass."""
    root = OmegaConf.merge(
        {"model": OmegaConf.structured(ModelConfig)},
        {"model": OmegaConf.load(PRESETS / f"{name}.yaml")},
    )
    cfg = OmegaConf.to_object(root.model)
    assert isinstance(cfg, ModelConfig)
    return cfg


# (total, active) parameters as measured; the comments in the preset files quote them.
PRESET_PARAMS = {
    "tiny": (2_756_736, 987_264),
    "tiny_dense": (984_192, 984_192),
    "mixtral_8x7b": (46.70e9, 12.88e9),
    "olmoe_1b7b": (6.92e9, 1.282e9),
    "qwen3_30b_a3b": (30.53e9, 3.35e9),
    "deepseek_v3": (671.03e9, 37.55e9),  # = transformers' DeepseekV3ForCausalLM (no MTP)
}


@pytest.mark.parametrize("name", sorted(PRESET_PARAMS))
def test_preset_builds_on_meta_with_expected_sizes(name):
    cfg = load_preset(name)
    assert cfg.moe.dim == cfg.dim
    with torch.device("meta"):
        model = Transformer(cfg)
    total, active = PRESET_PARAMS[name]
    assert model.num_params() == pytest.approx(total, rel=1e-3)
    assert model.num_active_params() == pytest.approx(active, rel=1e-3)


def test_every_preset_file_is_checked():
    assert {p.stem for p in PRESETS.glob("*.yaml")} == set(PRESET_PARAMS)


def test_tiny_dense_matches_tiny_active_params():
    tiny, dense = PRESET_PARAMS["tiny"][1], PRESET_PARAMS["tiny_dense"][1]
    assert abs(dense - tiny) / tiny < 0.01
    assert load_preset("tiny_dense").num_moe_layers == 0
