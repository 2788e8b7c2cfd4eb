"""NVIDIA apex, where it is installed: why a setting that needs it cannot be used here, in a line.

apex is never a dependency of moetrain. NVIDIA's apex is built from source with its CUDA
extensions (``amp_C`` for the fused optimizers, ``fused_layer_norm_cuda`` for the fused norms)
and ships in NGC's PyTorch images; the PyPI package named ``apex`` is an unrelated project, so
``pip install apex`` installs the wrong thing. Two settings use it: ``optim.implementation=apex``
(:data:`OPTIMIZERS`) and ``model.norm_impl=apex`` (:data:`NORMALIZATION`).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

# (apex subpackage, the CUDA extension its kernels live in)
OPTIMIZERS = ("apex.optimizers", "amp_C")
NORMALIZATION = ("apex.normalization.fused_layer_norm", "fused_layer_norm_cuda")


def _where() -> str:
    apex = sys.modules.get("apex")
    return getattr(apex, "__file__", None) or "a namespace package"


def problem(part: tuple[str, str]) -> str | None:
    """None when NVIDIA apex's ``part`` (:data:`OPTIMIZERS` or :data:`NORMALIZATION`) and its CUDA
    extension import; else why not, as a clause: not installed, the unrelated PyPI ``apex``, a
    broken install, or an apex built without its CUDA extensions."""
    module, extension = part
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == "apex":
            return "it is not installed"
        if err.name is not None and f"{module}.".startswith(f"{err.name}."):  # apex.<part>
            return (
                f"the installed apex ({_where()}) has no {module}: it is the unrelated PyPI "
                "package of that name, not NVIDIA's (pip uninstall apex)"
            )
        return f"import {module} failed: {err}"
    except Exception as err:  # a foreign or broken apex fails in its own ways: report, not raise
        return (
            f"import {module} failed ({type(err).__name__}: {err}); an apex from PyPI is an "
            "unrelated package (pip uninstall apex)"
        )
    try:
        importlib.import_module(extension)
    except ImportError as err:
        return (
            f"NVIDIA apex ({_where()}) was built without its CUDA extension {extension} ({err}); "
            "rebuild it with --cuda_ext"
        )
    return None


def message(setting: str, why: str, fallback: str) -> str:
    """The one line for ``<setting>=apex`` that cannot be used (``why``, from :func:`problem`)."""
    return (
        f"{setting}: apex needs NVIDIA apex, but {why}; NVIDIA apex ships in NGC PyTorch images "
        "(nvcr.io/nvidia/pytorch; do not `pip install apex`, an unrelated PyPI package); "
        f"use {fallback} instead"
    )


def require(part: tuple[str, str], setting: str, fallback: str) -> ModuleType:
    """NVIDIA apex's ``part`` module, imported; raises ``ValueError`` with :func:`message` when it
    cannot be used."""
    why = problem(part)
    if why is not None:
        raise ValueError(message(setting, why, fallback))
    return importlib.import_module(part[0])
