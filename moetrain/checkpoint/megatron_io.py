"""Megatron checkpoints as a source and a destination: :func:`load_megatron` (an eval-ready
model), :func:`load_megatron_weights` (``checkpoint.init_from``), :func:`save_megatron`
(``moetrain-convert --format megatron``). Reading: :mod:`moetrain.checkpoint.megatron`."""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

from moetrain.checkpoint.atomic import atomic_dir
from moetrain.checkpoint.build import empty_model
from moetrain.checkpoint.errors import CheckpointError
from moetrain.checkpoint.hf.adapter import ExportError
from moetrain.checkpoint.hf.stream import local_region
from moetrain.checkpoint.megatron import (
    COMMON,
    DIST_METADATA,
    TRACKER,
    MegatronTensors,
    iteration_dir,
    read_args,
)
from moetrain.checkpoint.megatron_config import args_from_config, config_from_args, export_problems
from moetrain.checkpoint.megatron_keys import state_from_megatron, state_to_megatron
from moetrain.models.config import ModelConfig

if TYPE_CHECKING:
    from moetrain.models import Transformer

# what Megatron-Core writes in metadata.json for its torch_dist format
DIST_METADATA_CONTENT = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version


def read_megatron(
    path: str | os.PathLike, setting: str, overrides: dict[str, Any] | None = None
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(the model config, moetrain's full state dict) of the Megatron checkpoint at ``path``
    (a save directory or an iteration directory); ``overrides``: Megatron-LM arguments the
    checkpoint lacks. Errors name ``setting``."""
    it = iteration_dir(path, setting)
    cfg = config_from_args(read_args(it, overrides))
    tensors = MegatronTensors(it)
    state = state_from_megatron(cfg, tensors.get)
    tensors.check_all_used()
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return cfg, state


def load_megatron(
    path: str | os.PathLike,
    setting: str = "load_model",
    overrides: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Transformer:
    """An eval-ready :class:`moetrain.models.Transformer` from a Megatron checkpoint."""
    cfg, state = read_megatron(path, setting, overrides)
    model = empty_model(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{setting}: {path}: the tensors do not match the args in {COMMON}: "
            f"{str(err).splitlines()[-1].strip()}"
        ) from None
    return model.to(dtype).eval()


def load_megatron_weights(path: str | os.PathLike, module: nn.Module, cfg: ModelConfig) -> None:
    """``checkpoint.init_from`` for a Megatron checkpoint: its weights into ``module`` (a model
    of ``cfg`` at any layout: whole tensors or DTensor shards, or one pipeline stage's layers
    under the full model's names). ``cfg`` must describe the same network as the checkpoint's
    args. Each process reads the whole checkpoint and keeps its own region."""
    from moetrain.checkpoint.hf.hub import check_same_model

    theirs, state = read_megatron(path, "checkpoint.init_from")
    hint = "set model.* to match, e.g. the config moetrain-convert --format native writes"
    check_same_model(cfg, theirs, path, hint)
    with torch.no_grad():
        for name, target in module.state_dict(keep_vars=True).items():
            if name not in state:
                raise CheckpointError(f"moetrain tensor {name!r} is not in the Megatron model")
            local, index = local_region(target)
            full = state[name]
            for dim, held in enumerate(index):
                if held is not None:
                    full = full.index_select(dim, held)
            local.copy_(full)


def _homogeneous(cfg: ModelConfig) -> bool:
    """Whether Megatron-Core stacks the layers under one key (it does unless moe_layer_freq is
    a pattern or > 1, as its TransformerBlock decides)."""
    return cfg.num_moe_layers == 0 or (cfg.first_k_dense == 0 and cfg.moe_layer_freq == 1)


def _stack_layers(cfg: ModelConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-layer names -> ``decoder.layers.<name>`` stacked over the layers (Megatron-Core's
    layout for identical layers)."""
    out: dict[str, Tensor] = {}
    per_layer: dict[str, list[Tensor]] = {}
    prefix = "decoder.layers."
    for name, t in tensors.items():
        if not name.startswith(prefix):
            out[name] = t
            continue
        _, rest = name[len(prefix) :].split(".", 1)
        per_layer.setdefault(prefix + rest, []).append(t)
    out.update({k: torch.stack(v) for k, v in per_layer.items()})
    return out


def _extra_state_names(cfg: ModelConfig, i: int) -> list[tuple[str, bool]]:
    """Layer ``i``'s modules that carry an ``_extra_state`` (``None`` without Transformer
    Engine's fp8), each with whether it is one per routed expert."""
    names = [("self_attention.linear_proj", False), ("self_attention.linear_qkv", False)]
    if not cfg.is_moe_layer(i):
        return [*names, ("mlp.linear_fc1", False), ("mlp.linear_fc2", False)]
    names += [("mlp.experts.experts.linear_fc1", True), ("mlp.experts.experts.linear_fc2", True)]
    if cfg.moe.num_shared_experts:
        shared = "mlp.shared_experts."
        names += [(shared + "linear_fc1", False), (shared + "linear_fc2", False)]
    return names


def _shard_suffix(axes: list[tuple[int, int]]) -> str:
    """ShardedObject's unique-key suffix: ``shard_<offsets>_<sizes>`` joined by dots."""
    return f"shard_{'.'.join(str(o) for o, _ in axes)}_{'.'.join(str(n) for _, n in axes)}"


def extra_states(cfg: ModelConfig, stacked: bool) -> dict[str, list[None]]:
    """The ``_extra_state`` objects Megatron-Core's loader asks for, by its unique keys
    (``<key>/shard_<offsets>_<sizes>`` over the layer and expert axes: stacked layers are one
    axis of num_layers, a per-layer key has a layer axis of 1 except per-expert objects, which
    have the expert axis only), each ``[None]`` (DCP pickles it as Megatron's loader expects: a
    list of the shards' objects), what its local-spec linear layers store."""
    out: dict[str, list[None]] = {}
    L, E = cfg.num_layers, cfg.moe.num_experts
    for i in range(L):
        layer = "decoder.layers." if stacked else f"decoder.layers.{i}."
        for name, per_expert in _extra_state_names(cfg, i):
            layer_axis = [(i, L)] if stacked else ([] if per_expert else [(0, 1)])
            for e in range(E) if per_expert else [None]:
                axes = layer_axis + ([] if e is None else [(e, E)])
                out[f"{layer}{name}._extra_state/{_shard_suffix(axes)}"] = [None]
    return out


def save_megatron(model: Transformer, path: str | os.PathLike) -> Path:
    """Write a single-process model as a Megatron-Core ``torch_dist`` checkpoint at ``path``
    (a new directory): ``latest_checkpointed_iteration.txt`` naming ``release/``, which holds
    ``metadata.json``, ``common.pt`` (``args``, ``checkpoint_version``, ``iteration``) and the
    tensors, unsharded (Megatron reshards them to any TP/EP/PP on load). Raises
    :class:`ExportError` naming what Megatron's GPTModel cannot express; nothing is written."""
    cfg = model.cfg
    problems = export_problems(cfg)
    if problems:
        raise ExportError("cannot export to Megatron: " + "; ".join(problems))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    dtype = state["tok_embeddings.weight"].dtype
    tensors = state_to_megatron(cfg, state)
    stacked = _homogeneous(cfg)
    if stacked:
        tensors = _stack_layers(cfg, tensors)
    entries: dict[str, Any] = {k: t.contiguous() for k, t in tensors.items()}
    entries.update(extra_states(cfg, stacked))
    args = argparse.Namespace(**args_from_config(cfg, dtype))
    with atomic_dir(path) as tmp:
        it = tmp / "release"
        it.mkdir()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(entries, checkpoint_id=str(it), no_dist=True)
        common = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
        torch.save(common, it / COMMON)
        (it / DIST_METADATA).write_text(json.dumps(DIST_METADATA_CONTENT))
        (tmp / TRACKER).write_text("release")
    return Path(path)
