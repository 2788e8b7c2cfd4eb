"""Where a checkpoint comes from: the one place that tells a Hugging Face hub directory
(``config.json`` + safetensors) from a native checkpoint and hands it to the right reader."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from torch import nn

from moetrain.checkpoint.hf import load_hf, load_hf_weights
from moetrain.checkpoint.locate import locate
from moetrain.checkpoint.native import load_model_weights, load_native_model
from moetrain.checkpoint.safetensors_io import is_hf_dir
from moetrain.models.config import ModelConfig

if TYPE_CHECKING:
    from moetrain.models import Transformer


def load_weights(path: str | os.PathLike, module: nn.Module, model_cfg: ModelConfig) -> None:
    """``checkpoint.init_from``: the weights at ``path`` into ``module``, a model of
    ``model_cfg`` already built at any layout (FSDP/EP/TP shards, or one pipeline stage's layers
    under the full model's names). ``path``: a hub directory (its ``config.json`` must describe
    the network ``model_cfg`` does), a native step directory, or a run directory (its newest
    complete checkpoint). Weights only: step, optimizer and data position start afresh."""
    if is_hf_dir(path):
        load_hf_weights(path, module, model_cfg)
    else:
        load_model_weights(locate(path, "checkpoint.init_from", hub=True), module)


def load_model(path: str | os.PathLike, setting: str = "load_model") -> Transformer:
    """An eval-ready :class:`moetrain.models.Transformer` from a native checkpoint saved at any
    layout (a step directory, or a run directory: its newest complete checkpoint), or from a
    Hugging Face hub directory (``config.json`` + safetensors). No process group needed:
    ``model(tokens_BS) -> logits_BSV``. ``setting``: the argument ``path`` came from (a command's
    ``--from``), which the error names when ``path`` holds no checkpoint (not a checkpoint, a
    run with none, or an incomplete save: :func:`moetrain.checkpoint.locate.locate`)."""
    if is_hf_dir(path):
        return load_hf(path)
    return load_native_model(path, setting)
