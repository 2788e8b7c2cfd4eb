"""Hub directories in and out: :func:`load_hf` (a model to evaluate), :func:`load_hf_weights`
(``checkpoint.init_from``: weights into a built, possibly sharded model), :func:`save_hf`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moetrain.checkpoint.build import empty_model
from moetrain.checkpoint.errors import CheckpointError
from moetrain.checkpoint.hf.registry import config_from_hf, config_to_hf
from moetrain.checkpoint.hf.stream import fill_from_hub
from moetrain.checkpoint.hf.weights import import_plan, state_to_hf
from moetrain.checkpoint.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    HubReader,
    read_config,
    write_hub_dir,
)
from moetrain.models.config import ModelConfig

if TYPE_CHECKING:
    from moetrain.models import Transformer


def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Transformer:
    """An eval-ready :class:`moetrain.models.Transformer` from a hub directory, filled tensor by
    tensor (the model plus one tensor in memory at a time)."""
    arch, cfg = config_from_hf(read_config(path))
    with HubReader(path) as reader:
        plan = import_plan(reader.shapes(), cfg, arch.name)  # checks names and shapes first
        model = empty_model(cfg)
        fill_from_hub(model, reader, plan)
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


def check_same_model(run: ModelConfig, theirs: ModelConfig, path: object, hint: str) -> None:
    """``CheckpointError`` naming every ``model.*`` field that differs between the run's config
    and the checkpoint's ``theirs`` (``checkpoint.init_from`` needs the same network); ``hint``
    says where a matching config comes from."""
    bad = _init_mismatch(run, theirs)
    if bad:
        raise CheckpointError(
            f"checkpoint.init_from: {path} is a different model: {'; '.join(bad)} ({hint})"
        )


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
    model's names); ``cfg`` must describe the same network as the hub's ``config.json``. Each
    process reads only the regions of the hub tensors that its parameters hold (plus every
    file's header); see :mod:`moetrain.checkpoint.hf.stream`."""
    arch, hub_cfg = config_from_hf(read_config(path))
    hint = "set model.* to match, e.g. start from the config moetrain-convert prints"
    check_same_model(cfg, hub_cfg, path, hint)
    with HubReader(path) as reader:
        fill_from_hub(model, reader, import_plan(reader.shapes(), cfg, arch.name))


def save_hf(
    model: Transformer,
    path: str | os.PathLike,
    arch_name: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Export a single-process moetrain model as a hub directory of ``arch_name``, written
    tensor by tensor from the model's own storage (split experts are views: no second copy)."""
    cfg = model.cfg
    state = model.state_dict()
    dtype = next(iter(state.values())).dtype
    config = config_to_hf(cfg, arch_name, dtype)
    return write_hub_dir(
        path, state_to_hf(state, cfg, arch_name), config, max_shard_bytes, extra_files
    )
