"""Run code as if optional packages were not installed (tests of what works without them)."""

from __future__ import annotations

OPTIONAL_APP_PACKAGES = ("hydra", "omegaconf", "wandb")


def blocker_source(blocked: tuple[str, ...] = OPTIONAL_APP_PACKAGES) -> str:
    """Python source that makes importing any of ``blocked`` (and their submodules) fail with
    ``ModuleNotFoundError``, as if they were not installed: run it first in a subprocess (``-c``)
    or as a ``sitecustomize.py`` on ``PYTHONPATH`` (then the subprocess's own children inherit
    it)."""
    return f"""import sys

BLOCKED = {tuple(blocked)!r}


class _Blocker:  # as if the packages were not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
"""
