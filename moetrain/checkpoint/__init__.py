"""Checkpoints: native (distributed, atomic, layout-independent) save, resume and init, and
Hugging Face hub directories (``moetrain.checkpoint.hf``)."""

from moetrain.checkpoint.errors import CheckpointError
from moetrain.checkpoint.io_stats import bytes_read
from moetrain.checkpoint.native import find_latest, load, save, verify
from moetrain.checkpoint.source import load_model, load_weights

__all__ = [
    "CheckpointError",
    "bytes_read",
    "find_latest",
    "load",
    "load_model",
    "load_weights",
    "save",
    "verify",
]
