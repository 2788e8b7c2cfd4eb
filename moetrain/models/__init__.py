"""The decoder model and its config. Public API: ``ModelConfig``, ``Transformer``."""

from moetrain.models.config import ModelConfig
from moetrain.models.transformer import Transformer

__all__ = ["ModelConfig", "Transformer"]
