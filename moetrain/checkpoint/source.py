"""Where a checkpoint comes from: the one place that tells a Megatron checkpoint
(``metadata.json`` or ``latest_checkpointed_iteration.txt``), a Hugging Face hub directory
(``config.json`` + safetensors) and a native checkpoint apart and hands each to its reader.

:data:`FORMATS` is the registry: the first format whose ``detect`` accepts the path reads it
(Megatron first: its iteration directories also hold a DCP ``.metadata``, as native ones do);
a path no format claims is read as a native checkpoint (whose errors say what is missing).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from moetrain.checkpoint.hf import load_hf, load_hf_weights
from moetrain.checkpoint.locate import locate
from moetrain.checkpoint.megatron import is_megatron_dir
from moetrain.checkpoint.megatron_io import load_megatron, load_megatron_weights
from moetrain.checkpoint.native import load_model_weights, load_native_model
from moetrain.checkpoint.safetensors_io import is_hf_dir
from moetrain.models.config import ModelConfig

if TYPE_CHECKING:
    from moetrain.models import Transformer


@dataclass(frozen=True)
class SourceFormat:
    """A checkpoint format moetrain reads: how to recognise it, read a model, fill a model."""

    name: str
    detect: Callable[[str | os.PathLike], bool]
    load_model: Callable[[str | os.PathLike, str], Transformer]
    load_weights: Callable[[str | os.PathLike, nn.Module, ModelConfig], None]


FORMATS: tuple[SourceFormat, ...] = (
    SourceFormat("megatron", is_megatron_dir, load_megatron, load_megatron_weights),
    SourceFormat("hf", is_hf_dir, lambda path, setting: load_hf(path), load_hf_weights),
)


def source_format(path: str | os.PathLike) -> SourceFormat | None:
    """The format of the checkpoint at ``path`` (None: native, or no checkpoint)."""
    return next((f for f in FORMATS if f.detect(path)), None)


def load_weights(path: str | os.PathLike, module: nn.Module, model_cfg: ModelConfig) -> None:
    """``checkpoint.init_from``: the weights at ``path`` into ``module``, a model of
    ``model_cfg`` already built at any layout (FSDP/EP/TP shards, or one pipeline stage's layers
    under the full model's names). ``path``: a Megatron save or iteration directory or a hub
    directory (its args / ``config.json`` must describe the network ``model_cfg`` does), a
    native step directory, or a run directory (its newest complete checkpoint). Weights only:
    step, optimizer and data position start afresh."""
    fmt = source_format(path)
    if fmt is not None:
        fmt.load_weights(path, module, model_cfg)
    else:
        load_model_weights(locate(path, "checkpoint.init_from", hub=True), module)


def load_model(path: str | os.PathLike, setting: str = "load_model") -> Transformer:
    """An eval-ready :class:`moetrain.models.Transformer` from a native checkpoint saved at any
    layout (a step directory, or a run directory: its newest complete checkpoint), from a
    Hugging Face hub directory (``config.json`` + safetensors), or from a Megatron-LM /
    Megatron-Core ``torch_dist`` checkpoint (a save or iteration directory). No process group
    needed: ``model(tokens_BS) -> logits_BSV``. ``setting``: the argument ``path`` came from
    (a command's ``--from``), which the error names when ``path`` holds no checkpoint (not a
    checkpoint, a run with none, or an incomplete save:
    :func:`moetrain.checkpoint.locate.locate`)."""
    fmt = source_format(path)
    if fmt is not None:
        return fmt.load_model(path, setting)
    return load_native_model(path, setting)
