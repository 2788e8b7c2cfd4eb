"""Which kernels run the ``moetrain`` ops: the compiled csrc extension, or the pure-torch reference.

The op schemas, autograd and fake kernels are defined in Python (``moetrain.ops.permute``,
``moetrain.ops.sort``); the extension ``moetrain._C`` (built from ``csrc/`` by setup.py) only
registers CPU and CUDA kernels for them, so it is loaded *after* the Python definitions. Without
it, the reference registered as ``CompositeExplicitAutograd`` runs everywhere — never silently:
:func:`active_backend` says which and why, and the trainer prints it at start. The compiled
kernels check themselves against the references on first use (``moetrain.ops.selfcheck``) and
give way to them on a mismatch.

``MOETRAIN_NO_CSRC=1`` skips loading (and building) the extension; the csrc tests then skip
instead of failing on a missing build.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

# define the ops first: the extension registers kernels for them and must load after
from moetrain.ops.permute import REFERENCES as PERMUTE_REFERENCES
from moetrain.ops.selfcheck import postponed, selfcheck_results, status_note
from moetrain.ops.sort import REFERENCES as SORT_REFERENCES

EXTENSION = "moetrain._C"
# op name -> pure-torch reference, for every op the extension implements
REFERENCES: dict[str, Callable[..., Any]] = {**PERMUTE_REFERENCES, **SORT_REFERENCES}
OPS = tuple(f"moetrain::{name}" for name in REFERENCES)


def csrc_disabled() -> bool:
    """True when ``MOETRAIN_NO_CSRC=1``: run (and test) without the compiled extension."""
    return os.environ.get("MOETRAIN_NO_CSRC") == "1"


def _load_extension() -> str | None:
    """Load the compiled kernels; returns None on success, else why they are not loaded."""
    if csrc_disabled():
        return "disabled by MOETRAIN_NO_CSRC=1"
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or spec.origin is None:
        return (
            f"{EXTENSION} not found; build it with `pip install --no-build-isolation -e .` "
            "(docs/development.md)"
        )
    try:
        # a plain shared library (no Python module init): loading runs its TORCH_LIBRARY_IMPLs
        torch.ops.load_library(spec.origin)
    except OSError as err:  # e.g. built against another torch: undefined symbols
        return f"{spec.origin} failed to load: {err}"
    return None


# Loaded once, when moetrain.ops is imported (after the op definitions).
_NOT_LOADED: str | None = _load_extension()


def extension_error() -> str | None:
    """None when the extension is loaded, else the reason it is not."""
    return _NOT_LOADED


def compiled_ops(device_key: str) -> list[str]:
    """The ops with a kernel registered for ``device_key`` ("CPU", "CUDA"): the compiled ones,
    unless something registered over them (the self-check's fallback, ``reference_kernels``)."""
    return [op for op in OPS if torch._C._dispatch_has_kernel_for_dispatch_key(op, device_key)]


def active_backend(device_key: str = "CPU") -> str:
    """Which kernels run the ops on ``device_key`` ("CPU" or "CUDA"), in words, with the
    self-check's outcome, e.g. ``csrc (C++ CPU, OpenMP 2 threads; self-check passed)``,
    ``pure-torch reference (csrc self-check failed on CPU: moetrain::permute max abs diff 1)``
    or ``pure-torch reference (extension not built: ...)``."""
    if selfcheck_results().get(device_key, {}).get("status") == "failed":
        return f"pure-torch reference ({status_note(device_key)})"
    compiled = compiled_ops(device_key)
    if len(compiled) == len(OPS):
        if device_key == "CPU":
            n = torch.get_num_threads()
            kind = f"C++ CPU, OpenMP {n} thread{'s' if n > 1 else ''}"
        else:
            kind = device_key
        return f"csrc ({kind}; {status_note(device_key)})"
    if compiled:  # a stale build that predates some op
        missing = sorted(set(OPS) - set(compiled))
        return (
            f"csrc for {', '.join(compiled)}; pure-torch reference for {', '.join(missing)} "
            f"({status_note(device_key)})"
        )
    if _NOT_LOADED is not None:
        return f"pure-torch reference (extension not built: {_NOT_LOADED})"
    return f"pure-torch reference (the extension was built without {device_key} kernels)"


@contextlib.contextmanager
def reference_kernels(device_key: str = "CPU") -> Iterator[None]:
    """Run the ops on ``device_key`` with the pure-torch references while inside the block,
    whatever is compiled (benchmarks and tests compare the two in one process). The autograd and
    fake registrations are unchanged: only the device kernels are swapped. The first-use
    self-check waits for the block to end (it checks the compiled kernels, not these)."""
    lib = torch.library.Library("moetrain", "IMPL")
    try:
        with warnings.catch_warnings():
            # registering over the compiled kernel warns "Overriding a previously registered
            # kernel"; the override is removed again when the block exits
            warnings.simplefilter("ignore", UserWarning)
            for name, fn in REFERENCES.items():
                lib.impl(name, fn, device_key, allow_override=True)
        with postponed(device_key):
            yield
    finally:
        lib._destroy()
