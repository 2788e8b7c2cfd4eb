"""Hugging Face adapters: import and export hub checkpoints (safetensors + ``config.json``).

One :class:`Arch` per architecture (``moetrain.checkpoint.hf_config``, which also maps the
config both ways) names every tensor; the weights move without arithmetic (experts are stacked
into / split out of moetrain's 3-D ``[E, F, D]`` tensors), so a round trip keeps every tensor
bit-identical. MoE architectures:
``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ``deepseek_v3``; dense (the upcycling
sources): ``llama``, ``mistral``, ``qwen2``, ``qwen3``.

Exported directories use the hub's key layout (per-expert tensors, as the published checkpoints
and ``transformers``' ``save_pretrained`` write them), so ``transformers``, vLLM and friends load
them. A model an architecture cannot express (e.g. dense layers or shared experts for Mixtral)
fails with a message naming what does not fit; nothing is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moetrain.checkpoint.hf_config import (
    ARCHS,
    MOE_ARCHS,
    Arch,
    ExportError,
    _fits,
    config_from_hf,
    config_to_hf,
    get_arch,
)
from moetrain.checkpoint.native import CheckpointError
from moetrain.checkpoint.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    read_config,
    read_tensors,
    write_hub_dir,
)
from moetrain.models.config import ModelConfig

if TYPE_CHECKING:
    from moetrain.models import Transformer

__all__ = [
    "ARCHS",
    "MOE_ARCHS",
    "Arch",
    "ExportError",
    "arch_of",
    "config_from_hf",
    "config_to_hf",
    "get_arch",
    "load_hf",
    "load_hf_weights",
    "save_hf",
    "state_from_hf",
    "state_to_hf",
]

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


@dataclass
class _Rule:
    """One moetrain tensor <- HF tensor(s): one name, or a stack of per-expert names."""

    ours: str
    theirs: list[str]
    stacked: bool = False


def _rules(cfg: ModelConfig, arch: Arch, names: list[str]) -> list[_Rule]:
    """The mapping for every name of a moetrain state dict (``names``)."""
    rules: list[_Rule] = []
    attn = _MLA if cfg.attention == "mla" else _ATTN
    for name in names:
        if name == "tok_embeddings.weight":
            rules.append(_Rule(name, ["model.embed_tokens.weight"]))
        elif name == "norm.weight":
            rules.append(_Rule(name, ["model.norm.weight"]))
        elif name == "output.weight":
            if not cfg.tie_embeddings:
                rules.append(_Rule(name, ["lm_head.weight"]))
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
                rules.append(_Rule(name, rule[0], rule[1]))
    return rules


def _layer_rule(
    arch: Arch, attn: dict[str, str], pre: str, rest: str, num_experts: int
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
    """moetrain state dict (full tensors) -> hub tensors of ``arch_name``."""
    arch = get_arch(arch_name)
    bad = _fits(arch, cfg)
    if bad:
        raise ExportError(f"cannot export to {arch.name}: " + "; ".join(bad))
    out: dict[str, Tensor] = {}
    for rule in _rules(cfg, arch, list(state)):
        tensor = state[rule.ours]
        if rule.stacked:
            out.update(zip(rule.theirs, tensor.unbind(0)))
        else:
            out[rule.theirs[0]] = tensor
    if arch.name == "qwen2_moe" and not cfg.moe.num_shared_experts:
        out.update(_empty_shared_expert(cfg, state))
    return out


def _empty_shared_expert(cfg: ModelConfig, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Qwen2-MoE always has a shared expert: "none" is one of size 0 (its gate is unused)."""
    like = state["tok_embeddings.weight"]
    D = cfg.dim
    out = {}
    for i in range(cfg.num_layers):
        if cfg.is_moe_layer(i):
            pre = f"model.layers.{i}.mlp.shared_expert"
            out[f"{pre}.gate_proj.weight"] = like.new_zeros(0, D)
            out[f"{pre}.up_proj.weight"] = like.new_zeros(0, D)
            out[f"{pre}.down_proj.weight"] = like.new_zeros(D, 0)
            out[f"{pre}_gate.weight"] = like.new_zeros(1, D)
    return out


def state_from_hf(
    hf_state: Mapping[str, Tensor],
    cfg: ModelConfig,
    arch_name: str,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Hub tensors of ``arch_name`` -> a full moetrain state dict for ``cfg`` (every tensor
    present and of the right shape, or a :class:`CheckpointError` naming the first problem).
    ``dtype``: cast floating tensors (None keeps the stored dtype)."""
    arch = get_arch(arch_name)
    reference = _reference_state(cfg)
    rules = _rules(cfg, arch, list(reference))
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    for rule in rules:
        missing = [n for n in rule.theirs if n not in hf_state]
        if missing:
            raise CheckpointError(
                f"the {arch.name} checkpoint has no tensor {missing[0]!r} (needed for "
                f"moetrain's {rule.ours}); is config.json the one these weights were saved with?"
            )
        parts = [hf_state[n] for n in rule.theirs]
        tensor = torch.stack(parts) if rule.stacked else parts[0]
        want = reference[rule.ours].shape
        if tensor.shape != want:
            raise CheckpointError(
                f"{rule.theirs[0]}: shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(want)} for moetrain's {rule.ours}"
            )
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[rule.ours] = tensor
        used.update(rule.theirs)
    for name, ref in reference.items():  # buffers the architecture does not store
        if name not in out and not (name == "output.weight" and cfg.tie_embeddings):
            out[name] = torch.zeros(ref.shape, dtype=ref.dtype)
    if cfg.tie_embeddings and "output.weight" in reference:
        out["output.weight"] = out["tok_embeddings.weight"]
    unused = sorted(n for n in hf_state if n not in used and not _ignorable(n, cfg, arch))
    if unused:
        raise CheckpointError(
            f"the {arch.name} checkpoint has {len(unused)} tensor(s) moetrain would not use, "
            f"e.g. {unused[0]!r}; refusing to drop weights silently"
        )
    return out


def _ignorable(name: str, cfg: ModelConfig, arch: Arch) -> bool:
    if name.endswith("rotary_emb.inv_freq"):
        return True
    if arch.name == "qwen2_moe" and not cfg.moe.num_shared_experts and ".shared_expert" in name:
        return True  # the size-0 shared expert and its gate
    if cfg.tie_embeddings and name == "lm_head.weight":
        return True
    match = re.match(r"model\.layers\.(\d+)\.", name)
    # DeepSeek-V3's multi-token-prediction layers sit after the last decoder layer
    return match is not None and int(match.group(1)) >= cfg.num_layers


# ------------------------------------------------------------------------------ the public API


def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Transformer:
    """An eval-ready :class:`moetrain.models.Transformer` from a hub directory."""
    from moetrain.models import Transformer

    arch, cfg = config_from_hf(read_config(path))
    state = state_from_hf(read_tensors(path), cfg, arch.name, dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(dtype).eval()


# what init_from needs to equal between the run's model config and the hub config: everything
# that decides a tensor's shape or what the model computes with it (routing options such as
# top_k, capacity or aux losses are the run's to choose)
_SAME_FOR_INIT = (
    "vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_size",
    "dense_hidden_dim", "rope_theta", "rope_scaling", "rope_scaling_factor", "qkv_bias",
    "qk_norm", "sliding_window", "norm_eps", "tie_embeddings", "first_k_dense",
    "moe_layer_freq", "attention", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "rope_interleave",
)  # fmt: skip
_SAME_FOR_INIT_MOE = (
    "num_experts", "hidden_dim", "activation", "score_func", "num_shared_experts",
    "shared_hidden", "shared_gate",
)  # fmt: skip


def _init_mismatch(run: ModelConfig, hub: ModelConfig) -> list[str]:
    dense_layers = run.num_layers - run.num_moe_layers
    bad = [
        f"model.{k}: {getattr(run, k)!r} here, {getattr(hub, k)!r} in the checkpoint"
        for k in _SAME_FOR_INIT
        if getattr(run, k, None) != getattr(hub, k, None)
        and not (k == "dense_hidden_dim" and dense_layers == 0)  # no dense MLP to size
    ]
    if run.num_moe_layers:
        bad += [
            f"model.moe.{k}: {getattr(run.moe, k)!r} here, {getattr(hub.moe, k)!r} in the "
            "checkpoint"
            for k in _SAME_FOR_INIT_MOE
            if getattr(run.moe, k) != getattr(hub.moe, k)
        ]
    return bad


def load_hf_weights(path: str | os.PathLike, model: torch.nn.Module, cfg: ModelConfig) -> None:
    """``checkpoint.init_from`` for a hub directory: its weights into ``model`` — a model of
    ``cfg`` at any layout (FSDP/EP/TP shards, or one pipeline stage's layers under the full
    model's names); ``cfg`` must describe the same network as the hub's ``config.json``."""
    arch, hub_cfg = config_from_hf(read_config(path))
    bad = _init_mismatch(cfg, hub_cfg)
    if bad:
        raise CheckpointError(
            f"checkpoint.init_from: {path} is a different model: "
            + "; ".join(bad)
            + " (set model.* to match, e.g. start from the config moetrain-convert prints)"
        )
    state = state_from_hf(read_tensors(path), cfg, arch.name)
    _copy_into(model, state)


def _copy_into(model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Full tensors into a model whose parameters may be DTensor shards."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            full = state[name].to(dtype=target.dtype)
            if isinstance(target, DTensor):
                local = distribute_tensor(
                    full.to(target.device), target.device_mesh, target.placements,
                    src_data_rank=None,
                ).to_local()  # fmt: skip
                target.to_local().copy_(local)
            else:
                target.copy_(full)


def save_hf(
    model: Transformer,
    path: str | os.PathLike,
    arch_name: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Export a single-process moetrain model as a hub directory of ``arch_name``."""
    cfg = model.cfg
    state = model.state_dict()
    dtype = next(iter(state.values())).dtype
    config = config_to_hf(cfg, arch_name, dtype)
    return write_hub_dir(
        path, state_to_hf(state, cfg, arch_name), config, max_shard_bytes, extra_files
    )


def arch_of(cfg: ModelConfig) -> str:
    """The first MoE architecture that expresses ``cfg`` (for ``--format hf`` without
    ``--arch``), or an :class:`ExportError` listing why none does."""
    names = MOE_ARCHS if cfg.num_moe_layers else tuple(a for a in ARCHS if not ARCHS[a].moe)
    reasons = {}
    for name in names:
        bad = _fits(ARCHS[name], cfg)
        if not bad:
            return name
        reasons[name] = bad[0]
    raise ExportError(
        "no Hugging Face architecture expresses this model: "
        + "; ".join(f"{k}: {v}" for k, v in reasons.items())
    )


__all__ = [
    "ARCHS",
    "Arch",
    "ExportError",
    "arch_of",
    "config_from_hf",
    "config_to_hf",
    "load_hf",
    "load_hf_weights",
    "save_hf",
    "state_from_hf",
    "state_to_hf",
]
