import math

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from moetrain.moe.config import MoEConfig

BAD_CONFIGS = [
    ("top_k", dict(num_experts=4, top_k=5)),
    ("num_groups", dict(num_experts=8, num_groups=3)),
    ("topk_groups", dict(num_experts=8, num_groups=2, topk_groups=3)),
    # 4 groups of 2 experts, only 1 group kept: at most 2 experts reachable
    ("top_k", dict(num_experts=8, top_k=3, num_groups=4, topk_groups=1)),
    ("capacity_factor", dict(capacity_factor=-1.0)),
    ("capacity_factor", dict(capacity_factor=0.0)),
    ("capacity_factor", dict(capacity_factor=math.inf)),
    ("capacity_factor", dict(capacity_factor=math.nan)),
    ("min_capacity", dict(capacity_factor=1.0, min_capacity=-1)),
    ("pad_to_capacity", dict(pad_to_capacity=True)),
    ("activation", dict(activation="relu")),
    ("score_func", dict(score_func="tanh")),
    ("drop_policy", dict(drop_policy="random")),
    ("router_type", dict(router_type="expert_choice")),
    ("aux_loss_scope", dict(aux_loss_scope="batch")),
    ("shared_gate", dict(shared_gate=True)),
    ("aux_loss_coeff", dict(aux_loss_coeff=-0.01)),
    ("z_loss_coeff", dict(z_loss_coeff=-1e-3)),
    ("aux_loss_coeff_per_layer", dict(aux_loss_coeff_per_layer=[0.01, -0.01])),
    ("bias_update_rate", dict(router_type="hash", bias_update_rate=1e-3)),
    ("bias_update_rate", dict(bias_update_rate=-1e-3)),
    ("num_experts", dict(num_experts=0)),
    ("routed_scaling_factor", dict(routed_scaling_factor=0.0)),
    ("logit_norm_scale", dict(logit_norm_scale=-1.0)),
    ("router_jitter", dict(router_jitter=1.0)),
]


@pytest.mark.parametrize(("field", "kwargs"), BAD_CONFIGS, ids=[f for f, _ in BAD_CONFIGS])
def test_bad_value_raises_naming_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"model\.moe\.{field}\b"):
        MoEConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_experts=8, top_k=4, num_groups=4, topk_groups=2),
        dict(capacity_factor=1.25, min_capacity=0, pad_to_capacity=True),
        dict(num_shared_experts=2, shared_gate=True),
        dict(score_func="sigmoid", bias_update_rate=1e-3),
        dict(router_type="hash", aux_loss_coeff=0.0),
    ],
)
def test_good_configs_validate(kwargs):
    cfg = MoEConfig(**kwargs)
    cfg.validate()  # validating twice is idempotent


def test_validate_catches_mutation_after_construction():
    cfg = MoEConfig(num_experts=4, top_k=2)
    cfg.top_k = 6
    with pytest.raises(ValueError, match=r"model\.moe\.top_k"):
        cfg.validate()


def test_omegaconf_structured_accepts_dataclass():
    node = OmegaConf.structured(MoEConfig)
    assert node.num_experts == 8
    assert node.capacity_factor is None
    merged = OmegaConf.merge(node, {"top_k": 3, "aux_loss_coeff_per_layer": [0.1, 0.2]})
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, MoEConfig)
    assert cfg.top_k == 3
    assert list(cfg.aux_loss_coeff_per_layer) == [0.1, 0.2]


def test_omegaconf_rejects_wrong_type():
    with pytest.raises(ValidationError):
        OmegaConf.merge(OmegaConf.structured(MoEConfig), {"top_k": "x"})
    node = OmegaConf.structured(MoEConfig)
    with pytest.raises(ValidationError):
        node.capacity_factor = "big"


def test_omegaconf_to_object_runs_validation():
    merged = OmegaConf.merge(OmegaConf.structured(MoEConfig), {"top_k": 30})
    with pytest.raises(ValueError, match=r"model\.moe\.top_k"):
        OmegaConf.to_object(merged)


def test_aux_coeff_for_layer():
    assert MoEConfig(aux_loss_coeff=0.02).aux_coeff_for_layer(5) == 0.02
    assert MoEConfig(aux_loss_coeff=0.02).aux_coeff_for_layer(None) == 0.02
    cfg = MoEConfig(aux_loss_coeff=0.02, aux_loss_coeff_per_layer=[0.1, 0.2, 0.3])
    assert cfg.aux_coeff_for_layer(0) == 0.1
    assert cfg.aux_coeff_for_layer(2) == 0.3


@pytest.mark.parametrize("layer_idx", [3, -1, None])
def test_aux_coeff_for_layer_out_of_range(layer_idx):
    cfg = MoEConfig(aux_loss_coeff_per_layer=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"model\.moe\.aux_loss_coeff_per_layer"):
        cfg.aux_coeff_for_layer(layer_idx)


def test_shared_hidden():
    assert MoEConfig(hidden_dim=24, num_shared_experts=3).shared_hidden == 72
    assert MoEConfig(hidden_dim=24, num_shared_experts=3, shared_hidden_dim=10).shared_hidden == 10
