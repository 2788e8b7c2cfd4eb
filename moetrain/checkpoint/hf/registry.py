"""The registry of Hugging Face adapters, one per architecture, and the lookups over it.

Order matters: :func:`arch_of` picks the first architecture that expresses a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moetrain.checkpoint.errors import CheckpointError
from moetrain.checkpoint.hf.adapter import ExportError, HFAdapter
from moetrain.checkpoint.hf.deepseek_v3 import DeepseekV3
from moetrain.checkpoint.hf.dense import Llama, Mistral, Qwen2, Qwen3
from moetrain.checkpoint.hf.mixtral import Mixtral
from moetrain.checkpoint.hf.olmoe import Olmoe
from moetrain.checkpoint.hf.qwen2_moe import Qwen2Moe
from moetrain.checkpoint.hf.qwen3_moe import Qwen3Moe
from moetrain.models.config import ModelConfig

# model_type -> adapter: the MoE architectures first, then the dense ones
ARCHS: dict[str, HFAdapter] = {
    adapter.name: adapter
    for adapter in (
        Mixtral(),
        Qwen2Moe(),
        Qwen3Moe(),
        Olmoe(),
        DeepseekV3(),
        Llama(),
        Mistral(),
        Qwen2(),
        Qwen3(),
    )
}


def get_arch(name: str) -> HFAdapter:
    """The adapter of architecture ``name`` (config.json's ``model_type``), or a
    :class:`CheckpointError` listing the supported ones."""
    if name not in ARCHS:
        raise CheckpointError(
            f"unknown Hugging Face architecture {name!r}; supported: {', '.join(ARCHS)}"
        )
    return ARCHS[name]


def config_from_hf(hf: Mapping[str, Any]) -> tuple[HFAdapter, ModelConfig]:
    """(its adapter, moetrain's :class:`ModelConfig`) for a hub ``config.json`` (as a dict)."""
    adapter = get_arch(str(hf.get("model_type")))
    return adapter, adapter.config_from_hf(hf)


def config_to_hf(cfg: ModelConfig, arch_name: str, dtype: torch.dtype) -> dict[str, Any]:
    """The hub ``config.json`` (as a dict) of ``cfg`` in architecture ``arch_name``; raises
    :class:`ExportError` naming everything that does not fit."""
    return get_arch(arch_name).config_to_hf(cfg, dtype)


def arch_of(cfg: ModelConfig) -> str:
    """The first architecture, MoE or dense as ``cfg`` is, that expresses ``cfg`` (for
    ``--format hf`` without ``--arch``), or an :class:`ExportError` listing why none does."""
    want_moe = cfg.num_moe_layers > 0
    reasons = {}
    for name, adapter in ARCHS.items():
        if adapter.moe != want_moe:
            continue
        bad = adapter.fits(cfg)
        if not bad:
            return name
        reasons[name] = bad[0]
    raise ExportError(
        "no Hugging Face architecture expresses this model: "
        + "; ".join(f"{k}: {v}" for k, v in reasons.items())
    )
