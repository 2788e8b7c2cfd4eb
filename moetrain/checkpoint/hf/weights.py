"""Tensor names between moetrain and a Hugging Face architecture, both ways.

The adapter names the parts that differ (MoE block, expert projections, shared expert, score
bias); this module maps every tensor of a moetrain state dict with them. Weights move without
arithmetic (experts are stacked into / split out of moetrain's 3-D ``[E, F, D]`` tensors), so a
round trip keeps every tensor bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from moetrain.checkpoint.errors import CheckpointError
from moetrain.checkpoint.hf.adapter import HFAdapter
from moetrain.checkpoint.hf.registry import get_arch
from moetrain.models.config import ModelConfig

_ATTN = {
    "wq.weight": "q_proj.weight",
    "wq.bias": "q_proj.bias",
    "wk.weight": "k_proj.weight",
    "wk.bias": "k_proj.bias",
    "wv.weight": "v_proj.weight",
    "wv.bias": "v_proj.bias",
    "wo.weight": "o_proj.weight",
    "q_norm.weight": "q_norm.weight",
    "k_norm.weight": "k_norm.weight",
}
_MLA = {
    "wq.weight": "q_proj.weight",
    "wq_a.weight": "q_a_proj.weight",
    "q_norm.weight": "q_a_layernorm.weight",
    "wq_b.weight": "q_b_proj.weight",
    "wkv_a.weight": "kv_a_proj_with_mqa.weight",
    "kv_norm.weight": "kv_a_layernorm.weight",
    "wkv_b.weight": "kv_b_proj.weight",
    "wo.weight": "o_proj.weight",
}
_DENSE = {
    "w1.weight": "gate_proj.weight",
    "w3.weight": "up_proj.weight",
    "w2.weight": "down_proj.weight",
}
_SHARED = {"w1_HD": "gate_proj.weight", "w3_HD": "up_proj.weight", "w2_DH": "down_proj.weight"}
_EXPERTS = ("w1_EFD", "w3_EFD", "w2_EDF")


@dataclass(frozen=True)
class Rule:
    """One moetrain tensor <- hub tensor(s): one name of the same shape and layout, or (stacked)
    one name per expert, expert ``e`` being slice ``e`` of dim 0; no transposes."""

    ours: str
    theirs: list[str]
    stacked: bool = False


def _rules(cfg: ModelConfig, arch: HFAdapter, names: list[str]) -> list[Rule]:
    """The mapping for every name of a moetrain state dict (``names``)."""
    rules: list[Rule] = []
    attn = _MLA if cfg.attention == "mla" else _ATTN
    for name in names:
        if name == "tok_embeddings.weight":
            rules.append(Rule(name, ["model.embed_tokens.weight"]))
        elif name == "norm.weight":
            rules.append(Rule(name, ["model.norm.weight"]))
        elif name == "output.weight":
            if not cfg.tie_embeddings:
                rules.append(Rule(name, ["lm_head.weight"]))
        else:
            match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
            if match is None:
                raise CheckpointError(f"no Hugging Face name for moetrain tensor {name!r}")
            layer, rest = int(match.group(1)), match.group(2)
            pre = f"model.layers.{layer}."
            rule = _layer_rule(arch, attn, pre, rest, cfg.moe.num_experts)
            if rule is None:
                raise CheckpointError(f"no {arch.name} name for moetrain tensor {name!r}")
            if rule:
                rules.append(Rule(name, rule[0], rule[1]))
    return rules


def _layer_rule(
    arch: HFAdapter, attn: dict[str, str], pre: str, rest: str, num_experts: int
) -> tuple[list[str], bool] | tuple[()] | None:
    if rest == "attention_norm.weight":
        return [pre + "input_layernorm.weight"], False
    if rest == "ffn_norm.weight":
        return [pre + "post_attention_layernorm.weight"], False
    if rest.startswith("attention."):
        hf = attn.get(rest.removeprefix("attention."))
        return ([pre + "self_attn." + hf], False) if hf else None
    if not rest.startswith("feed_forward."):
        return None
    ff = rest.removeprefix("feed_forward.")
    if ff in _DENSE:
        return [pre + "mlp." + _DENSE[ff]], False
    moe = pre + arch.moe_block + "."
    if ff == "router.weight_ED":
        return [moe + "gate.weight"], False
    if ff == "router.expert_bias_E":
        return ([moe + "gate." + arch.expert_bias], False) if arch.expert_bias else ()
    if ff == "adaptive_aux.coeff":  # training state: not exported, starts afresh on import
        return ()
    if ff.startswith("experts."):
        which = _EXPERTS.index(ff.removeprefix("experts."))
        proj = arch.experts[which]
        return [f"{moe}experts.{e}.{proj}.weight" for e in range(num_experts)], True
    if ff.startswith("shared_experts.") and arch.shared:
        part = ff.removeprefix("shared_experts.")
        if part == "gate_1D" and arch.shared_gate:
            return [moe + arch.shared_gate + ".weight"], False
        if part in _SHARED:
            return [f"{moe}{arch.shared}.{_SHARED[part]}"], False
    return None


def _reference_state(cfg: ModelConfig) -> dict[str, Tensor]:
    """Names, shapes and dtypes of a moetrain model of ``cfg`` (built on the meta device)."""
    from moetrain.models import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return model.state_dict()


# ----------------------------------------------------------------------------- state: both ways


def state_to_hf(state: Mapping[str, Tensor], cfg: ModelConfig, arch_name: str) -> dict[str, Tensor]:
    """moetrain state dict (full tensors) -> hub tensors of ``arch_name``; an
    :class:`~moetrain.checkpoint.hf.adapter.ExportError` lists what does not fit."""
    arch = get_arch(arch_name)
    arch.require_fit(cfg)
    out: dict[str, Tensor] = {}
    for rule in _rules(cfg, arch, list(state)):
        tensor = state[rule.ours]
        if rule.stacked:
            out.update(zip(rule.theirs, tensor.unbind(0)))
        else:
            out[rule.theirs[0]] = tensor
    out.update(arch.extra_tensors_to_hf(cfg, state))
    return out


def import_plan(
    hub_shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, arch_name: str
) -> dict[str, Rule | None]:
    """Which hub tensor(s) of ``arch_name`` fill each tensor of a moetrain model of ``cfg``, by
    moetrain name, checked from the hub's tensor names and shapes alone (no data): every needed
    tensor present with the shape ``cfg`` implies and none left unused, or a
    :class:`CheckpointError` naming the first problem. None: a buffer the architecture does not
    store (it starts at zero); with tied embeddings ``output.weight`` reads the embedding."""
    arch = get_arch(arch_name)
    reference = {name: tuple(t.shape) for name, t in _reference_state(cfg).items()}
    plan: dict[str, Rule | None] = dict.fromkeys(reference)
    used: set[str] = set()
    for rule in _rules(cfg, arch, list(reference)):
        missing = [n for n in rule.theirs if n not in hub_shapes]
        if missing:
            raise CheckpointError(
                f"the {arch.name} checkpoint has no tensor {missing[0]!r} (needed for "
                f"moetrain's {rule.ours}); is config.json the one these weights were saved with?"
            )
        want = reference[rule.ours]
        part = want[1:] if rule.stacked else want  # one expert's slice of a stacked tensor
        for name in rule.theirs:
            if tuple(hub_shapes[name]) != part:
                raise CheckpointError(
                    f"{name}: shape {tuple(hub_shapes[name])} but config.json implies "
                    f"{part} for moetrain's {rule.ours}" + (" (one expert)" if rule.stacked else "")
                )
        plan[rule.ours] = rule
        used.update(rule.theirs)
    if cfg.tie_embeddings and "output.weight" in reference:
        plan["output.weight"] = plan["tok_embeddings.weight"]
    unused = sorted(n for n in hub_shapes if n not in used and not _ignorable(n, cfg, arch))
    if unused:
        raise CheckpointError(
            f"the {arch.name} checkpoint has {len(unused)} tensor(s) moetrain would not use, "
            f"e.g. {unused[0]!r}; refusing to drop weights silently"
        )
    return plan


def state_from_hf(
    hf_state: Mapping[str, Tensor],
    cfg: ModelConfig,
    arch_name: str,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Hub tensors of ``arch_name`` (all in memory) -> a full moetrain state dict for ``cfg``,
    checked as :func:`import_plan` does. ``dtype``: cast floating tensors (None keeps the stored
    dtype). Loading a model streams instead (:mod:`moetrain.checkpoint.hf.stream`)."""
    plan = import_plan({n: tuple(t.shape) for n, t in hf_state.items()}, cfg, arch_name)
    reference = _reference_state(cfg)
    out: dict[str, Tensor] = {}
    for name, rule in plan.items():
        if rule is None:  # a buffer the architecture does not store
            out[name] = torch.zeros(reference[name].shape, dtype=reference[name].dtype)
            continue
        parts = [hf_state[n] for n in rule.theirs]
        tensor = torch.stack(parts) if rule.stacked else parts[0]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor
    if cfg.tie_embeddings and "output.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def _ignorable(name: str, cfg: ModelConfig, arch: HFAdapter) -> bool:
    if name.endswith("rotary_emb.inv_freq"):
        return True
    if arch.ignores(name, cfg):
        return True
    if cfg.tie_embeddings and name == "lm_head.weight":
        return True
    match = re.match(r"model\.layers\.(\d+)\.", name)
    # DeepSeek-V3's multi-token-prediction layers sit after the last decoder layer
    return match is not None and int(match.group(1)) >= cfg.num_layers
