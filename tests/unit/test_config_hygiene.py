"""No silently ignored keys: a ``+``/``++`` key the schema lacks is an error, every choice is
checked even where unused, and a setting away from its default that the rest of the config
ignores gives one warning (none for the defaults or the shipped presets)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Dict

import pytest
from omegaconf import OmegaConf

from moetrain.config.schema import Config
from moetrain.config.unused import ineffective_keys
from moetrain.config.validate import ConfigError, reject_unknown_keys, validate
from moetrain.train import cli
from moetrain.train.cli import CONFIG_DIR, compose_config


def config(*overrides: str) -> Config:
    cfg = OmegaConf.to_object(compose_config(list(overrides)))
    assert isinstance(cfg, Config)
    return cfg


# --- +key / ++key ---------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["+train.stepz=5", "++train.stepz=5"])
def test_appended_typo_is_an_error_naming_key_and_fix(override):
    with pytest.raises(ConfigError) as info:
        compose_config([override])
    message = str(info.value)
    assert message.startswith("train.stepz: unknown key")
    assert "did you mean train.steps?" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("override", "key", "fix"),
    [
        ("+foo=1", "foo", "the config has: model, data, train"),
        ("+model.moe.qqq=1", "model.moe.qqq", "model.moe has: num_experts"),
        ("++logging.wandb.projekt=x", "logging.wandb.projekt", "logging.wandb.project?"),
    ],
)
def test_appended_key_at_any_depth_is_an_error(override, key, fix):
    with pytest.raises(ConfigError, match=rf"^{key}: unknown key.*{fix}"):
        compose_config([override])


def test_every_appended_key_is_named():
    with pytest.raises(ConfigError) as info:
        compose_config(["+train.stepz=5", "+optim.lrr=1"])
    assert "train.stepz" in str(info.value) and "optim.lrr" in str(info.value)


def test_force_override_of_a_known_key_still_works():
    assert config("++train.steps=5").train.steps == 5


@dataclasses.dataclass
class _Inner:
    x: int = 0


@dataclasses.dataclass
class _WithDict:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    extra: Dict[str, int] = dataclasses.field(default_factory=dict)


def test_keys_added_under_a_dict_field_are_allowed():
    cfg = OmegaConf.structured(_WithDict)
    OmegaConf.update(cfg, "extra.anything", 3, force_add=True)  # what Hydra's + does
    reject_unknown_keys(cfg)
    OmegaConf.update(cfg, "inner.xx", 1, force_add=True)
    with pytest.raises(ConfigError, match=r"^inner\.xx: unknown key.*did you mean inner\.x\?"):
        reject_unknown_keys(cfg)


def test_schema_has_no_dict_fields_today():
    """If one is added, the test above is what keeps +key working under it."""

    def dict_fields(cls: type, prefix: str) -> list[str]:
        found = []
        for name, hint in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(hint):
                found += dict_fields(hint, f"{prefix}{name}.")  # type: ignore[arg-type]
            elif "Dict" in str(hint) or "dict" in str(hint):
                found.append(prefix + name)
        return found

    assert dict_fields(Config, "") == []


# --- choices are checked even where unused --------------------------------------------------


def test_pp_schedule_choice_is_checked_at_pp_1():
    with pytest.raises(ConfigError, match=r"parallel\.pp_schedule: must be one of 1f1b, gpipe"):
        validate(config("parallel.pp_schedule=bogus"))


def test_gating_residual_is_refused_across_pipeline_stages(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"model\.moe\.gating_residual: .*parallel\.pp=1"):
        validate(config("parallel.pp=2", "model.moe.gating_residual=true"))
    validate(config("parallel.pp=2", "model.moe.num_copy_experts=1"))  # the others are fine


def test_data_path_without_tokens_source_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path: .*data\.source is stdlib.*data=tokens"):
        validate(config(f"data.path={tmp_path}"))


# --- settings that have no effect -----------------------------------------------------------

INEFFECTIVE = [
    (["parallel.pp_schedule=gpipe"], "parallel.pp_schedule=gpipe", "parallel.pp=1"),
    (["parallel.ep_ranks_per_node=4"], "parallel.ep_ranks_per_node=4", "ep_a2a=flat"),
    (["optim.momentum=0.9"], "optim.momentum=0.9", "optim=sgd"),
    (["optim=sgd", "optim.betas=[0.8,0.9]"], "optim.betas=[0.8,0.9]", "optim.name=sgd"),
    (["optim=sgd", "optim.eps=1e-6"], "optim.eps=1e-06", "optim.name=sgd"),
    (["optim.decay_fraction=0.3"], "optim.decay_fraction=0.3", "schedule=cosine"),
    (["optim.schedule=constant", "optim.min_lr_ratio=0.5"], "optim.min_lr_ratio=0.5", "constant"),
    (["train.max_skipped_steps=3"], "train.max_skipped_steps=3", "nonfinite=stop"),
    (
        ["checkpoint.final=false", "checkpoint.keep_last=5"],
        "checkpoint.keep_last=5",
        "checkpoint.interval=0 and checkpoint.final=false",
    ),
    (["model.q_lora_rank=64"], "model.q_lora_rank=64", "model.attention=gqa"),
    (["model.kv_lora_rank=64"], "model.kv_lora_rank=64", "model.attention=gqa"),
    (["model.qk_nope_head_dim=32"], "model.qk_nope_head_dim=32", "model.attention=gqa"),
    (["model.qk_rope_head_dim=32"], "model.qk_rope_head_dim=32", "model.attention=gqa"),
    (["model.v_head_dim=32"], "model.v_head_dim=32", "model.attention=gqa"),
    (["model.rope_interleave=false"], "model.rope_interleave=false", "model.attention=gqa"),
    (["model=deepseek_v3", "model.num_kv_heads=8"], "model.num_kv_heads=8", "attention=mla"),
    (["model.yarn_beta_fast=64"], "model.yarn_beta_fast=64.0", "rope_scaling=none"),
    (["model.rope_original_max_seq_len=128"], "model.rope_original_max_seq_len=128", "none"),
    (["model.moe.drop_policy=position"], "model.moe.drop_policy=position", "dropless"),
    (["model.moe.min_capacity=8"], "model.moe.min_capacity=8", "capacity_factor=null"),
    (["model.moe.shared_hidden_dim=64"], "model.moe.shared_hidden_dim=64", "num_shared"),
    (["model.moe.bias_load=kept"], "model.moe.bias_load=kept", "bias_update_rate"),
    (
        ["model.moe.bias_load=kept", "model.moe.bias_update_rate=0.001"],
        "model.moe.bias_load=kept",
        "capacity_factor",
    ),
    (
        ["model.moe.aux_loss_coeff=0.1", "model.moe.aux_loss_coeff_per_layer=[0.1,0.1,0.1]"],
        "model.moe.aux_loss_coeff=0.1",
        "aux_loss_coeff_per_layer set",
    ),
    (["model.moe.max_k=3"], "model.moe.max_k=3", "top_p=null"),
    (["model.moe.min_k=2"], "model.moe.min_k=2", "top_p=null"),
    (["model.moe.top_k_start=2"], "model.moe.top_k_start=2", "top_k_schedule_steps=null"),
    (
        ["model.moe.dense_to_sparse_threshold=0.1"],
        "model.moe.dense_to_sparse_threshold=0.1",
        "dense_to_sparse_steps=null",
    ),
    (
        ["model.moe.adaptive_aux_sensitivity=0.5"],
        "model.moe.adaptive_aux_sensitivity=0.5",
        "adaptive_aux_smoothing=null",
    ),
    (
        ["model.moe.zero_compute_aux_weight=0.5"],
        "model.moe.zero_compute_aux_weight=0.5",
        "without zero-computation experts",
    ),
    (
        [
            "model.moe.expert_choice=sequence",
            "model.moe.capacity_factor=1.0",
            "model.moe.aux_loss_scope=sequence",
        ],
        "model.moe.aux_loss_scope=sequence",
        "model.moe.expert_choice",
    ),
    (["model=tiny_dense", "model.moe.top_k=4"], "model.moe.top_k=4", "without MoE layers"),
    (["model=tiny_dense", "model.moe_layer_freq=2"], "model.moe_layer_freq=2", "without MoE"),
]
SCORELESS = [
    "aux_loss_coeff=0.1",
    "aux_loss_coeff_per_layer=[0.1,0.1,0.1]",
    "aux_loss_scope=sequence",
    "z_loss_coeff=0.1",
    "logit_norm_scale=2.0",
    "router_jitter=0.1",
    "score_func=sigmoid",
    "norm_topk_prob=false",
]
INEFFECTIVE += [
    ([f"model.moe.router_type={router}", f"model.moe.{key}"], f"model.moe.{key}", router)
    for router in ("random", "hash")
    for key in SCORELESS
]


@pytest.mark.parametrize(
    ("overrides", "named", "why"), INEFFECTIVE, ids=[" ".join(c[0]) for c in INEFFECTIVE]
)
def test_ineffective_setting_gives_one_message(overrides, named, why):
    cfg = config(*overrides)
    validate(cfg)  # a warning, not an error
    (message,) = ineffective_keys(cfg)
    assert message.startswith(f"{named} has no effect")
    assert why in message and "\n" not in message


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.pp_schedule=1f1b"],  # the default, set explicitly
        ["optim.momentum=0.0"],
        ["optim=sgd", "optim.betas=[0.9,0.95]"],
        ["optim.schedule=wsd", "optim.decay_fraction=0.3"],
        ["model.moe.capacity_factor=1.25", "model.moe.drop_policy=position"],
        ["model.moe.router_type=random", "model.moe.aux_loss_coeff=0.01"],
        ["model.moe.z_loss_coeff=0.1", "model.moe.router_jitter=0.1"],  # learned router
        ["checkpoint.interval=5", "checkpoint.keep_last=5"],
        ["checkpoint.keep_last=5"],  # the final checkpoints of a resumed run count
        ["train.nonfinite=skip", "train.max_skipped_steps=3"],
        ["model.moe.top_p=0.5", "model.moe.max_k=3", "model.moe.min_k=2"],
        ["model.moe.num_copy_experts=1", "model.moe.zero_compute_aux_weight=0.5"],
        ["model.moe.top_k_schedule_steps=10", "model.moe.top_k_start=1"],
        ["model.moe.dense_to_sparse_steps=10", "model.moe.dense_to_sparse_threshold=0.1"],
        ["model.moe.adaptive_aux_smoothing=0.9", "model.moe.adaptive_aux_sensitivity=0.5"],
    ],
)
def test_effective_or_default_settings_give_none(overrides):
    assert ineffective_keys(config(*overrides)) == []


def test_default_config_gives_none():
    cfg = config()
    validate(cfg)
    assert ineffective_keys(cfg) == []
    assert ineffective_keys(Config()) == []


def _presets(group: str) -> list[str]:
    names = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
    assert names, f"no presets in {CONFIG_DIR}/{group}"
    return names


@pytest.mark.parametrize("model", _presets("model"))
@pytest.mark.parametrize("optim", _presets("optim"))
@pytest.mark.parametrize("experiment", [None, *_presets("experiment")])
def test_shipped_presets_give_none(model, optim, experiment):
    chosen = [f"experiment={experiment}"] if experiment else []
    cfg = config(f"model={model}", f"optim={optim}", *chosen)
    validate(cfg)
    assert ineffective_keys(cfg) == []


@pytest.mark.parametrize("data", _presets("data"))
@pytest.mark.parametrize("parallel", _presets("parallel"))
def test_shipped_data_and_parallel_presets_give_none(data, parallel, tmp_path):
    path = {
        "tokens": [f"data.path={tmp_path}"],
        "mix": [f"data.sources=[{{path: {tmp_path}, weight: 1.0}}]"],
    }.get(data, [])
    cfg = config(f"data={data}", f"parallel={parallel}", *path)
    validate(cfg)
    assert ineffective_keys(cfg) == []


# --- printing -------------------------------------------------------------------------------


@pytest.mark.parametrize(("rank", "printed"), [(None, True), ("0", True), ("1", False)])
def test_warnings_print_once_per_launch_on_rank_0(monkeypatch, capsys, rank, printed):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    cli.warn(ineffective_keys(config("optim.momentum=0.9")))
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    if printed:
        assert len(lines) == 1
        assert lines[0].startswith("moetrain-train: warning: optim.momentum=0.9 has no effect")
    else:
        assert lines == []


def test_saved_config_marks_the_keys_that_have_no_effect():
    """The run's config.yaml marks every key the rest of the config makes moot (MLA keys of a
    GQA model, capacity keys of a dropless one, SGD's momentum under AdamW) with a comment,
    and loads back to the same config."""
    from moetrain.config.unused import inapplicable_keys, mark_inapplicable

    cfg = config()
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    marked = mark_inapplicable(text, inapplicable_keys(cfg))
    lines = {line.strip().split(":", 1)[0]: line for line in marked.splitlines()}
    for key in ("q_lora_rank", "kv_lora_rank", "drop_policy", "min_capacity", "momentum"):
        assert "  # no effect with " in lines[key], key
    assert "# no effect" not in lines["num_kv_heads"] and "# no effect" not in lines["top_k"]
    assert marked.count("# no effect") == len(inapplicable_keys(cfg))
    assert OmegaConf.to_container(OmegaConf.create(marked)) == OmegaConf.to_container(
        OmegaConf.create(text)
    )
