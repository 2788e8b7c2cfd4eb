"""Hugging Face hub directories: safetensors weights (one file, or shards with an index) and
``config.json``.

Weights from outside are read only as safetensors (a JSON header and raw bytes: no pickle), one
region at a time (:class:`HubReader`). A truncated or corrupted file fails with a
:class:`~moetrain.checkpoint.errors.CheckpointError` naming the file. Writing streams tensor by
tensor and is atomic (:func:`~moetrain.checkpoint.atomic.atomic_dir`): an interrupted export
never leaves a directory that looks loadable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moetrain.checkpoint.atomic import atomic_dir, write_text_files
from moetrain.checkpoint.errors import CheckpointError
from moetrain.checkpoint.safetensors_file import SafetensorsFile, Selector, write_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size ("5GB")


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A directory holding ``config.json`` (a Hugging Face model directory)."""
    return (Path(path) / "config.json").is_file()


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: cannot read the model config ({err})") from err


def _weight_files(root: Path) -> dict[str, list[str]]:
    """file name -> tensor names, from the index when there is one."""
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from err
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        return files
    if (root / SINGLE_FILE).is_file():
        return {SINGLE_FILE: []}  # every tensor in the file
    pickled = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    hint = (
        f" (found {', '.join(pickled)}: pickled weights can run code when loaded and are not "
        "read; re-save them as safetensors with transformers' save_pretrained)"
        if pickled
        else ""
    )
    raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


class HubReader:
    """The safetensors files of a hub directory, open for region reads (a context manager).
    Opening reads every file's header only: the tensor names, shapes and dtypes the import
    checks need. Tensor data is read on demand, one region at a time (see
    :class:`~moetrain.checkpoint.safetensors_file.SafetensorsFile`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        root = Path(path)
        self._files: list[SafetensorsFile] = []
        self._where: dict[str, SafetensorsFile] = {}
        try:
            for file, names in _weight_files(root).items():
                self._open(root / file, names)
        except BaseException:
            self.close()
            raise

    def _open(self, full: Path, names: list[str]) -> None:
        if not full.is_file():
            raise CheckpointError(f"{full}: listed in {INDEX_FILE} but missing")
        handle = SafetensorsFile(full)
        self._files.append(handle)
        for name in names or handle.entries:
            if name not in handle.entries:
                raise CheckpointError(
                    f"{full}: has no tensor {name!r}, which {INDEX_FILE} places there"
                )
            self._where[name] = handle

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and shape (from the headers)."""
        return {name: f.entries[name].shape for name, f in self._where.items()}

    def read(self, name: str, index: Sequence[Selector] | None = None) -> Tensor:
        """The region ``index`` selects of tensor ``name`` (None: all of it), in its stored
        dtype; see :meth:`SafetensorsFile.read`."""
        return self._where[name].read(name, index)

    def close(self) -> None:
        for handle in self._files:
            handle.close()

    def __enter__(self) -> HubReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a hub directory, by name (its stored dtype). Holds them all: model
    loading reads region by region through :class:`HubReader` instead."""
    with HubReader(path) as reader:
        return {name: reader.read(name) for name in reader.shapes()}


def _shards(tensors: Mapping[str, Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_hub_dir(
    path: str | os.PathLike,
    tensors: Mapping[str, Tensor],
    config: Mapping[str, Any],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` and ``config`` as a hub directory at ``path`` (which must not exist or be
    empty): ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` (a larger single tensor gets a shard of its own) with
    ``model.safetensors.index.json``; ``extra_files``: more text files (relative path -> text)
    written inside before the rename."""
    with atomic_dir(path) as tmp:
        groups = _shards(tensors, max_shard_bytes)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(groups, start=1):
            file = (
                SINGLE_FILE
                if len(groups) == 1
                else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            )
            # tensor by tensor: views (split experts) are written without a copy
            write_file(tmp / file, {n: tensors[n] for n in names}, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
        if len(groups) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        write_text_files(tmp, extra_files)
    return Path(path)


def tensor_dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (config.json's ``dtype``)."""
    return str(dtype).removeprefix("torch.")
