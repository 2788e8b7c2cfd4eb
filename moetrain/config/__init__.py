"""Structured configs of the training app, registered with Hydra's ConfigStore."""

from moetrain.config.schema import Config
from moetrain.config.validate import ConfigError, validate

try:
    from hydra.core.config_store import ConfigStore
except ImportError:  # the library (the memory plan, the optimizer's groups) reads the schema
    pass  # without Hydra installed; only the app (moetrain.train.cli) needs it registered
else:
    ConfigStore.instance().store(name="config_schema", node=Config)

__all__ = ["Config", "ConfigError", "validate"]
