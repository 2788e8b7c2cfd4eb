"""Test helpers shipped with the library (later issues' tests and users' tests use them)."""

from moetrain.testing.distributed import run_distributed

__all__ = ["run_distributed"]
