"""Settings that have no effect under the rest of the config.

Each rule names the keys one setting makes meaningless (``model.attention=gqa`` makes the MLA
keys so). ``ineffective_keys`` turns the rules into warnings for keys set away from their
schema default; ``inapplicable_keys`` lists every such key whatever its value, so the run's
saved ``config.yaml`` can mark them. docs/configuration.md ("Keys that have no effect") lists
the cases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from moetrain.config.schema import Config
from moetrain.moe.baseline_routers import HashRouter, RandomRouter
from moetrain.moe.router_registry import router_class


@dataclass(frozen=True)
class Unused:
    """Key ``<section>.<key>`` holds ``value`` (schema default ``default``) and has no effect
    ``why``."""

    section: str
    key: str
    value: Any
    default: Any
    why: str

    @property
    def path(self) -> str:
        return f"{self.section}.{self.key}"


def ineffective_keys(cfg: Config) -> list[str]:
    """One message per setting away from its schema default that has no effect under the rest
    of ``cfg`` (``<key>=<value> has no effect ...; <fix>``), for the caller to print as a
    warning. Call it after ``validate``; the shipped presets give none."""
    return [
        f"{u.path}={_show(u.value)} has no effect {u.why}"
        for u in _all_unused(cfg)
        if u.value != u.default
    ]


def inapplicable_keys(cfg: Config) -> dict[str, str]:
    """Every key that has no effect under the rest of ``cfg``, whatever its value:
    ``{"model.q_lora_rank": "with model.attention=gqa (...)", ...}``."""
    return {u.path: u.why for u in _all_unused(cfg)}


def _all_unused(cfg: Config) -> list[Unused]:
    found: list[Unused] = []
    checks = (_unused_train, _unused_data, _unused_optim, _unused_parallel, _unused_model)
    for check in (*checks, _unused_moe):
        found.extend(check(cfg))
    return found


def _default(obj: Any, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(obj)}[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _show(value: Any) -> str:
    """``value`` as a command-line override would write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def _unused(obj: Any, section: str, keys: Iterable[str], why: str) -> list[Unused]:
    """``<section>.<key>`` has no effect ``why``, for each of ``keys`` of ``obj``."""
    return [Unused(section, key, getattr(obj, key), _default(obj, key), why) for key in keys]


def _unused_train(cfg: Config) -> list[Unused]:
    found: list[Unused] = []
    if cfg.train.nonfinite == "stop":
        found += _unused(
            cfg.train, "train", ["max_skipped_steps"], "with train.nonfinite=stop (it bounds skip)"
        )
    if cfg.checkpoint.interval == 0 and not cfg.checkpoint.final:
        found += _unused(
            cfg.checkpoint,
            "checkpoint",
            ["keep_last"],
            "with checkpoint.interval=0 and checkpoint.final=false (no checkpoint is saved); "
            "set checkpoint.interval or checkpoint.final=true",
        )
    return found


def _unused_data(cfg: Config) -> list[Unused]:
    d = cfg.data
    found: list[Unused] = []
    if not d.document_mask:
        found += _unused(
            d,
            "data",
            ["document_positions"],
            "with data.document_mask=false (positions restart only in masked documents); set "
            "data.document_mask=true",
        )
    if d.source != "mix":
        found += _unused(
            d,
            "data",
            ["allow_mixture_change"],
            f"with data.source={d.source} (it lets a resumed run change its mixture)",
        )
    return found


def _unused_optim(cfg: Config) -> list[Unused]:
    o = cfg.optim
    found: list[Unused] = []
    if o.name == "adamw":
        found += _unused(
            o,
            "optim",
            ["momentum"],
            "with optim.name=adamw (an SGD setting; AdamW's momentum is optim.betas[0]); for SGD "
            "with momentum use optim=sgd",
        )
    else:
        found += _unused(
            o, "optim", ["betas", "eps"], f"with optim.name={o.name} (an AdamW setting)"
        )
    if o.schedule != "wsd":
        found += _unused(
            o, "optim", ["decay_fraction"], f"with optim.schedule={o.schedule} (a wsd setting)"
        )
    if o.schedule == "constant":
        found += _unused(
            o, "optim", ["min_lr_ratio"], "with optim.schedule=constant (the lr never decays)"
        )
    return found


def _unused_parallel(cfg: Config) -> list[Unused]:
    p = cfg.parallel
    found: list[Unused] = []
    if p.pp == 1:
        found += _unused(
            p, "parallel", ["pp_schedule"], "with parallel.pp=1 (no pipeline to schedule)"
        )
    moe = cfg.model.moe
    node_routing = moe.max_node_groups is not None or moe.locality_bias > 0
    if p.expert_sharding == "ep" and p.ep_a2a == "flat" and not node_routing:
        found += _unused(
            p,
            "parallel",
            ["ep_ranks_per_node"],
            "with parallel.ep_a2a=flat (it sizes the hierarchical and node_dedup exchanges' "
            "node groups, and places node-limited routing's); set parallel.ep_a2a=hierarchical "
            "to use it",
        )
    return found


MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
YARN_KEYS = ("rope_original_max_seq_len", "yarn_beta_fast", "yarn_beta_slow")


def _unused_model(cfg: Config) -> list[Unused]:
    m = cfg.model
    found: list[Unused] = []
    if m.attention == "gqa":
        found += _unused(
            m,
            "model",
            [*MLA_KEYS, "rope_interleave"],
            "with model.attention=gqa (an MLA setting); set model.attention=mla to use it",
        )
    else:
        found += _unused(
            m,
            "model",
            ["num_kv_heads"],
            f"with model.attention={m.attention} (MLA's keys and values have model.num_heads "
            "heads)",
        )
    if m.rope_scaling != "yarn":
        found += _unused(
            m, "model", YARN_KEYS, f"with model.rope_scaling={m.rope_scaling} (a YaRN setting)"
        )
    return found


# what a router without scores (no logits, no probabilities: RandomRouter, HashRouter) ignores
SCORE_KEYS = (
    "score_func",
    "norm_topk_prob",
    "logit_norm_scale",
    "router_jitter",
    "aux_loss_coeff",
    "aux_loss_coeff_per_layer",
    "aux_loss_scope",
    "z_loss_coeff",
)


def _unused_moe(cfg: Config) -> list[Unused]:
    m, moe = cfg.model, cfg.model.moe
    if not m.num_moe_layers:
        why = (
            f"in a model without MoE layers (model.first_k_dense={m.first_k_dense} >= "
            f"model.num_layers={m.num_layers})"
        )
        keys = [f.name for f in dataclasses.fields(moe) if f.name != "dim"]
        return _unused(m, "model", ["moe_layer_freq"], why) + _unused(moe, "model.moe", keys, why)
    found: list[Unused] = []
    if issubclass(router_class(moe.router_type), (RandomRouter, HashRouter)):
        found += _unused(
            moe,
            "model.moe",
            SCORE_KEYS,
            f"with model.moe.router_type={moe.router_type} (it has no router scores: no score "
            "function, renormalization, jitter or aux losses)",
        )
    elif moe.aux_loss_coeff_per_layer is not None:
        found += _unused(
            moe,
            "model.moe",
            ["aux_loss_coeff"],
            "with model.moe.aux_loss_coeff_per_layer set (it gives every layer's coefficient)",
        )
    if moe.capacity_factor is None:
        found += _unused(
            moe,
            "model.moe",
            ["drop_policy", "min_capacity"],
            "with model.moe.capacity_factor=null (dropless: no capacity, nothing dropped); set "
            "model.moe.capacity_factor to drop tokens",
        )
    if moe.num_shared_experts == 0:
        found += _unused(
            moe, "model.moe", ["shared_hidden_dim"], "with model.moe.num_shared_experts=0"
        )
    found += _unused_routes(moe)
    if moe.bias_update_rate is None or moe.capacity_factor is None:
        found += _unused(
            moe,
            "model.moe",
            ["bias_load"],
            "without both model.moe.bias_update_rate (aux-loss-free balancing) and "
            "model.moe.capacity_factor (dropping): it chooses which loads that balancing counts",
        )
    return found


def _unused_routes(moe) -> list[Unused]:
    """The routing-research keys (moetrain.moe.routes) that an option leaves without effect."""
    found: list[Unused] = []
    if moe.top_p is None:
        found += _unused(moe, "model.moe", ["min_k", "max_k"], "with model.moe.top_p=null")
    if moe.num_zero_experts + moe.num_copy_experts + moe.num_constant_experts == 0:
        found += _unused(
            moe,
            "model.moe",
            ["zero_compute_aux_weight"],
            "without zero-computation experts (model.moe.num_zero/copy/constant_experts)",
        )
    if moe.expert_choice is not None:
        found += _unused(
            moe,
            "model.moe",
            ["aux_loss_coeff", "aux_loss_coeff_per_layer", "aux_loss_scope", "drop_policy"],
            "with model.moe.expert_choice (every expert takes the same number of tokens: no "
            "balance loss, nothing dropped)",
        )
    return found + _unused_policies(moe)


def _unused_policies(moe) -> list[Unused]:
    """The routing-policy keys (moetrain.moe.policies) that an option leaves without effect."""
    found: list[Unused] = []
    if moe.dense_to_sparse_steps is None:
        found += _unused(
            moe,
            "model.moe",
            ["dense_to_sparse_temperature", "dense_to_sparse_threshold"],
            "with model.moe.dense_to_sparse_steps=null (no dense-to-sparse gate)",
        )
    if moe.top_k_schedule_steps is None:
        found += _unused(
            moe, "model.moe", ["top_k_start"], "with model.moe.top_k_schedule_steps=null"
        )
    if moe.adaptive_aux_smoothing is None:
        found += _unused(
            moe,
            "model.moe",
            ["adaptive_aux_sensitivity"],
            "with model.moe.adaptive_aux_smoothing=null (static aux coefficients)",
        )
    return found


def mark_inapplicable(yaml_text: str, marks: dict[str, str]) -> str:
    """``yaml_text`` (OmegaConf's block-style dump of a config) with ``  # no effect <why>``
    after each key of ``marks`` (dotted paths, as ``inapplicable_keys`` gives); the YAML's
    content is unchanged."""
    out: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the mapping keys above this line
    for line in yaml_text.splitlines():
        stripped = line.lstrip(" ")
        indent = len(line) - len(stripped)
        if stripped.startswith("-") or ":" not in stripped:  # list items, continuations
            out.append(line)
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, stripped.split(":", 1)[0]))
        path = ".".join(key for _, key in stack)
        out.append(f"{line}  # no effect {marks[path]}" if path in marks else line)
    return "\n".join(out) + "\n"
