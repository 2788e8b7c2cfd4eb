"""Checkpoints: native (distributed, atomic, layout-independent) save, resume and init."""

from moetrain.checkpoint.native import (
    CheckpointError,
    find_latest,
    load,
    load_model,
    save,
    verify,
)

__all__ = ["CheckpointError", "find_latest", "load", "load_model", "save", "verify"]
