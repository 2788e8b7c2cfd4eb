"""Structured configs of the training app, registered with Hydra's ConfigStore."""

from hydra.core.config_store import ConfigStore

from moetrain.config.schema import Config
from moetrain.config.validate import ConfigError, validate

ConfigStore.instance().store(name="config_schema", node=Config)

__all__ = ["Config", "ConfigError", "validate"]
