"""moetrain: Mixture-of-Experts language-model training, from one process to many nodes."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def load_model(path: str | os.PathLike) -> nn.Module:
    """An eval-ready model from a native checkpoint directory (any layout it was saved at):
    ``model(tokens_BS) -> logits_BSV``. Imported lazily: ``import moetrain`` stays light."""
    from moetrain.checkpoint import load_model as _load_model

    return _load_model(path)
