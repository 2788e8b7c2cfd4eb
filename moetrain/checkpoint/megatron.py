"""Megatron-LM / Megatron-Core checkpoints in and out: the distributed ``torch_dist`` format.

Telling the formats apart (:func:`is_megatron_dir`): a Megatron *iteration directory*
(``iter_0000010/`` or ``release/``) holds ``metadata.json`` (``{"sharded_backend": "torch_dist",
...}``), ``common.pt`` and torch.distributed.checkpoint files (``.metadata``, ``*.distcp``); a
Megatron *save directory* holds ``latest_checkpointed_iteration.txt`` (the newest iteration, or
``release``) and the iteration directories. The legacy per-rank format
(``mp_rank_XX/model_optim_rng.pt``) is recognised and refused. A native moetrain checkpoint has
``train_state.json``/``checksums.json`` and no ``metadata.json``; a Hugging Face hub directory
has ``config.json``.

The model config comes from ``args`` in ``common.pt`` (Megatron-LM's ``argparse.Namespace``,
:mod:`moetrain.checkpoint.megatron_config`); the tensors are read with
torch.distributed.checkpoint, single-process, as whole (unsharded) tensors whatever TP/EP/PP
layout wrote them, and renamed by :mod:`moetrain.checkpoint.megatron_keys`.

Safety: nothing is unpickled beyond an allow-list. ``common.pt`` is read with
``torch.load(weights_only=True)`` allowing ``argparse.Namespace`` (torch dtypes and plain data
are allowed by torch already) and Megatron's ``AttnBackend`` enum (the ``attention_backend``
argument, read as a string stand-in: megatron-core is not imported). DCP's ``.metadata``
(pickled by torch) is read with an unpickler that only builds torch's checkpoint-metadata
dataclasses and enums, ``torch.Size``, dtypes and ``pathlib.PosixPath``. The ``_extra_state``
byte entries (pickled objects: Transformer Engine's fp8 state) and the rng and optimizer
objects are never read. Anything else is refused with one line.

A checkpoint whose model tensors are not all used (biases, MTP layers, anything its args do not
state) is refused too: nothing is dropped silently.

Memory: the importer holds the checkpoint's tensors and the model (about twice the model).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import json
import os
import pathlib
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from moetrain.checkpoint.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
DIST_METADATA = "metadata.json"
COMMON = "common.pt"
LEGACY = "model_optim_rng.pt"

# the classes a DCP .metadata may build: torch's checkpoint-metadata dataclasses and enums
_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)


def _attn_backend(value: Any) -> str:
    """Stand-in for ``megatron.core.transformer.enums.AttnBackend(value)`` in ``args``."""
    return f"AttnBackend({value})"


# common.pt's allow-list, beyond what torch.load(weights_only=True) allows by itself
ARGS_SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    (_attn_backend, "megatron.core.transformer.enums.AttnBackend"),
]


def _legacy(path: Path) -> bool:
    return any(path.glob(f"mp_rank_*/{LEGACY}"))


def _iterations(root: Path) -> list[Path]:
    """The ``iter_*`` directories of a save directory, newest first."""
    found = [p for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def is_megatron_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Megatron save or iteration directory (distributed or legacy)."""
    root = Path(path)
    return root.is_dir() and (
        (root / DIST_METADATA).is_file()
        or (root / TRACKER).is_file()
        or _legacy(root)
        or any((it / DIST_METADATA).is_file() or _legacy(it) for it in _iterations(root))
    )


def _tracked(root: Path, setting: str) -> Path:
    """The iteration directory a save directory's tracker file names (without one: its newest
    ``iter_*``)."""
    if not (root / TRACKER).is_file():
        return _iterations(root)[0]
    tag = (root / TRACKER).read_text().strip()
    if tag != "release" and not tag.isdigit():
        raise CheckpointError(
            f"{setting}: {root / TRACKER} holds {tag!r}, not an iteration number or 'release'"
        )
    it = root / (tag if tag == "release" else f"iter_{int(tag):07d}")
    if not it.is_dir():
        raise CheckpointError(f"{setting}: {root / TRACKER} names {it.name}, which is missing")
    return it


def iteration_dir(path: str | os.PathLike, setting: str) -> Path:
    """The iteration directory ``path`` names (itself, or the one its tracker file names), in
    the ``torch_dist`` format; a :class:`CheckpointError` naming ``setting`` otherwise."""
    root = Path(path)
    it = root
    if not (root / DIST_METADATA).is_file() and not _legacy(root):
        it = _tracked(root, setting) if (root / TRACKER).is_file() or _iterations(root) else root
    if _legacy(it) and not (it / DIST_METADATA).is_file():
        raise CheckpointError(
            f"{setting}: {it} is Megatron's legacy per-rank format ({LEGACY}), which moetrain "
            "does not read; convert it to torch_dist with Megatron-LM (--ckpt-convert-format "
            "torch_dist) first"
        )
    if not (it / DIST_METADATA).is_file():
        raise CheckpointError(f"{setting}: {it} is not a Megatron checkpoint (no {DIST_METADATA})")
    backend = json.loads((it / DIST_METADATA).read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise CheckpointError(
            f"{setting}: {it} uses Megatron's {backend!r} backend; moetrain reads torch_dist "
            "(re-save with Megatron-LM's --ckpt-format torch_dist)"
        )
    return it


def _unsupported_global(err: Exception) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else str(err).splitlines()[0]


def read_common(it: Path) -> dict[str, Any]:
    """``common.pt`` (the non-tensor part), unpickling only the allow-listed classes."""
    path = it / COMMON
    if not path.is_file():
        raise CheckpointError(f"{it}: no {COMMON}; not a complete Megatron checkpoint")
    try:
        with torch.serialization.safe_globals(ARGS_SAFE_GLOBALS):
            common = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds {_unsupported_global(err)}, which moetrain does not unpickle (it reads "
            "argparse.Namespace args and plain data only); nothing was converted"
        ) from None
    return common if isinstance(common, dict) else {}


def read_args(it: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Megatron-LM's arguments from ``common.pt`` (a dict; empty without them), updated with
    ``overrides`` (what the checkpoint lacks, by Megatron-LM's argument names)."""
    args = read_common(it).get("args")
    out = dict(vars(args)) if isinstance(args, argparse.Namespace) else {}
    out.update(overrides or {})
    return out


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = isinstance(getattr(torch, name, None), torch.dtype)
        if module == "torch" and (name == "Size" or is_dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("pathlib", "PosixPath"):  # torch's own saves record their path
            return pathlib.PosixPath
        if module in _DCP_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)
            ):
                return obj
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")


class SafeReader(FileSystemReader):
    """A DCP reader whose ``.metadata`` is unpickled through an allow-list (see the module
    doc); the tensor data itself torch reads with ``weights_only``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{path} holds {_unsupported_global(err)}, which moetrain does not unpickle"
            ) from None
        except (EOFError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path} is truncated or damaged ({err})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
# where a checkpoint's model tensors live (optimizer state and rng objects live elsewhere)
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")
_EXPERT_INDEXED = re.compile(r"\.experts\.experts\.\d+\.")


def _expert_key(name: str, e: int) -> str:
    """Routed expert ``e``'s own key (``singleton_local_shards`` checkpoints)."""
    return name.replace(".experts.experts.", f".experts.experts.{e}.", 1)


class MegatronTensors:
    """Whole tensors of a ``torch_dist`` iteration directory by Megatron's per-layer names
    (:mod:`moetrain.checkpoint.megatron_keys`), read single-process. Layers stacked under
    ``decoder.layers.<name>`` (read once, cached), per-expert keys and ``_w``/``_v`` SwiGLU
    halves are resolved here."""

    def __init__(self, it: Path) -> None:
        self.dir = it
        self.reader = SafeReader(it)
        md = self.reader.read_metadata()
        self.shapes = {
            k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        self._cache: dict[str, Tensor] = {}
        self.used: set[str] = set()  # the stored keys read so far

    def read(self, key: str) -> Tensor:
        self.used.add(key)
        if key not in self._cache:
            meta = self.shapes[key]
            state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=SafeReader(self.dir), no_dist=True)
            self._cache[key] = state[key]
        return self._cache[key]

    def find(self, name: str) -> Tensor | None:
        if name in self.shapes:
            return self.read(name)
        layer = _LAYER.fullmatch(name)
        if layer and f"decoder.layers.{layer[2]}" in self.shapes:
            return self.read(f"decoder.layers.{layer[2]}")[int(layer[1])]
        if ".experts.experts." in name and not _EXPERT_INDEXED.search(name):
            experts: list[Tensor] = []
            while (t := self.find(_expert_key(name, len(experts)))) is not None:
                experts.append(t)
            if experts:
                return torch.stack(experts)
        if not name.endswith(("_w", "_v")):
            w, v = self.find(name + "_w"), self.find(name + "_v")
            if w is not None and v is not None:
                return torch.cat([w, v], dim=-2)
        return None

    def get(self, *names: str) -> Tensor:
        """The first of ``names`` the checkpoint holds; a :class:`CheckpointError` if none."""
        for n, name in enumerate(names):
            found = self.find(name)
            if found is not None:
                for other in names[n + 1 :]:  # the same tensor under another spec's name
                    self.find(other)
                return found
        raise CheckpointError(
            f"{self.dir}: no tensor {' or '.join(names)}; the checkpoint's tensors do not match "
            "its args (or the model uses a layer spec moetrain does not read)"
        )

    def unused(self) -> list[str]:
        """The stored model tensors nothing has read (after a whole import: what moetrain's
        model has no place for, e.g. linear biases, MTP layers)."""
        model = (k for k in self.shapes if k.startswith(MODEL_PREFIXES))
        return sorted(k for k in model if k not in self.used)

    def check_all_used(self) -> None:
        """Raise one :class:`CheckpointError` line naming the unread model tensors, if any."""
        unused = self.unused()
        if unused:
            more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
            raise CheckpointError(
                f"{self.dir} holds tensors moetrain has no place for ({', '.join(unused[:3])}"
                f"{more}): the model has a feature its args do not state or moetrain cannot "
                "express; nothing was converted"
            )
