"""One safetensors file, read by region and written tensor by tensor.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a JSON header (per tensor: dtype, shape, ``data_offsets`` into the data that follows), then raw
little-endian tensor bytes. Nothing is unpickled or executed.

Why not ``safetensors.safe_open``: it maps the whole file and keeps every page it touches
resident until the handle closes, so reading a checkpoint into a model holds the model twice
(its tensors and the file's pages). Here a region is copied out of a read-only memory map and
the pages it touched are released at once (``madvise(MADV_DONTNEED)``; they stay in the page
cache), and writing streams each tensor's bytes to the file without copying the set.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from moetrain.checkpoint.errors import CheckpointError
from moetrain.checkpoint.io_stats import add_bytes_read

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit
# the raw bits of an item of each size: regions are copied as bits, never converted
_BITS: dict[int, np.dtype] = {n: np.dtype(f"<u{n}") for n in (1, 2, 4, 8)}

# one index per dimension: a slice with step 1, or sorted global indices (a strided shard)
Selector = slice | np.ndarray


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in its file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offset of its first byte
    nbytes: int


def _bad(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a readable safetensors file, truncated or corrupted? ({detail})"
    )


def read_header(path: Path) -> tuple[dict[str, Entry], int]:
    """(tensor name -> entry, header bytes read) from ``path``'s header, validated against the
    file's size: a truncated or corrupted file is a :class:`CheckpointError` naming it."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"{size} bytes, shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise _bad(path, f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(path, f"header: {err}") from err
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    data_len = size - 8 - n
    entries = {
        name: _entry(path, name, info, 8 + n, data_len)
        for name, info in header.items()
        if name != "__metadata__"
    }
    end = max((e.begin + e.nbytes - 8 - n for e in entries.values()), default=0)
    if end != data_len:
        raise _bad(path, f"{data_len} bytes of data, the header describes {end}")
    return entries, 8 + n


def _entry(path: Path, name: str, info: Any, base: int, data_len: int) -> Entry:
    try:
        dtype = DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as err:
        raise _bad(path, f"tensor {name!r}: bad header entry {info!r}") from err
    nbytes = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end <= data_len or end - begin != nbytes:
        raise _bad(path, f"tensor {name!r}: offsets {[begin, end]} for {nbytes} bytes")
    return Entry(dtype, shape, base + begin, nbytes)


class SafetensorsFile:
    """A safetensors file open for region reads: the header is read (and counted in
    :func:`~moetrain.checkpoint.io_stats.bytes_read`) on opening, tensor data on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries, header_bytes = read_header(path)
        add_bytes_read(header_bytes)
        self._file: IO[bytes] | None = None
        self._map: mmap.mmap | None = None

    def read(self, name: str, index: Sequence[Selector] | None = None) -> Tensor:
        """A new CPU tensor (the stored dtype) holding the region of tensor ``name`` that
        ``index`` selects (one :data:`Selector` per dimension; None: the whole tensor). Only the
        region's bytes are copied out (and counted in ``bytes_read``)."""
        entry = self.entries[name]
        index = list(index) if index is not None else [slice(None)] * len(entry.shape)
        shape = [_length(sel, n) for sel, n in zip(index, entry.shape)]
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=entry.dtype)
        raw = np.ndarray(entry.shape, _BITS[entry.dtype.itemsize], self._mapped(), entry.begin)
        region = _select(raw, index)
        del raw  # no view of the map may outlive the read (the map could not close)
        add_bytes_read(region.nbytes)
        self._release(entry)
        return torch.from_numpy(region).view(entry.dtype)

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            self._file = self.path.open("rb")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def _release(self, entry: Entry) -> None:
        """Drop the pages of ``entry`` from this process (they stay in the page cache)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = entry.begin - entry.begin % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, entry.begin + entry.nbytes - start)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        if self._file is not None:
            self._file.close()
        self._map = self._file = None


def _length(sel: Selector, n: int) -> int:
    return len(range(n)[sel]) if isinstance(sel, slice) else len(sel)


def _select(raw: np.ndarray, index: Sequence[Selector]) -> np.ndarray:
    """A contiguous copy of ``raw[index]``: slices first (a view), then index lists within
    their bounding range (``np.take`` copies only the rows it names)."""
    bounds = [
        sel if isinstance(sel, slice) else slice(int(sel[0]), int(sel[-1]) + 1) for sel in index
    ]
    region = raw[tuple(bounds)]
    copied = False
    for dim, sel in enumerate(index):
        if not isinstance(sel, slice):
            region, copied = np.take(region, sel - sel[0], axis=dim), True
    return region if copied else np.array(region, copy=True, order="C")


def write_file(
    path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` as one safetensors file, one tensor at a time: views and tensors that
    share storage are written as they are (no copy of the set; a non-contiguous tensor is made
    contiguous alone). Laid out by item size, largest first, then by name, as safetensors does
    (every tensor aligned to its item size)."""
    if sys.byteorder != "little":
        raise CheckpointError("writing safetensors needs a little-endian machine")
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _CODES:
            raise CheckpointError(f"{name}: dtype {t.dtype} has no safetensors code")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            _write_tensor(f, tensors[name])


def _write_tensor(f: IO[bytes], tensor: Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    if t.numel():
        f.write(t.reshape(-1).view(torch.uint8).numpy().data)
