"""The MoE layer and its parts. Public API: ``MoEConfig``, ``MoELayer``."""

from moetrain.moe.config import MoEConfig
from moetrain.moe.layer import MoELayer, MoEStats

__all__ = ["MoEConfig", "MoELayer", "MoEStats"]
