"""Read-only reader for Megatron-LM indexed datasets (``PREFIX.idx`` + ``PREFIX.bin``, MMIDIDX).

The ``.idx`` file (all integers little-endian, no padding)::

    offset 0   9 bytes   magic b"MMIDIDX\\x00\\x00"
    offset 9   uint64    version, always 1
    offset 17  uint8     token dtype code (see ``DTYPE_CODES``)
    offset 18  uint64    S, the number of sequences
    offset 26  uint64    D, the number of entries of ``document_indices``
    offset 34  int32[S]  sequence lengths, in tokens
               int64[S]  sequence pointers, byte offsets into ``.bin``
               int64[D]  document indices: the sequence index where each document starts, with a
                         leading 0 and the sequence count last, so document j is the sequences
                         ``[document_indices[j], document_indices[j + 1])`` and D - 1 documents
               int8[S]   only in multimodal datasets: one mode per sequence (not read here)

The ``.bin`` file is the tokens of all sequences back to back in that dtype, no header. The
header carries no multimodal flag (Megatron-Core 0.16 takes it as a reader argument), so bytes
after the document indices are ignored. Both files are memory-mapped read-only; nothing is copied
until a caller copies.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, index count
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("u1"),
    2: np.dtype("i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f8"),
    7: np.dtype("<f4"),
    8: np.dtype("<u2"),
}
REGENERATE_HINT = "re-create it with Megatron-LM's tools/preprocess_data.py"


class MegatronIndexedDataset:
    """The Megatron-LM indexed dataset at ``prefix`` (opens ``prefix.idx`` and ``prefix.bin``).

    Read-only and memory-mapped: ``sequence``, ``document``, ``sequence_lengths``,
    ``sequence_pointers`` and ``document_boundaries`` are views of the files, not copies (a
    ``document`` whose sequences are not adjacent in ``.bin`` is the one exception: a copy).

    Raises ``FileNotFoundError`` when either file is missing and ``ValueError`` when the ``.idx``
    has the wrong magic, version or dtype code or is shorter than its header says, or the
    ``.bin`` is shorter than the index says; each message is one line naming the file.
    """

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = os.fspath(prefix)
        self.idx_path = self.prefix + ".idx"
        self.bin_path = self.prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: not found; {_missing_hint(self.prefix)}")
        self.dtype, num_sequences, num_indices = _read_header(self.idx_path)
        self._idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        _check_index_size(self.idx_path, self._idx.size, num_sequences, num_indices)
        offset = HEADER.size
        self.sequence_lengths: np.ndarray = _view(self._idx, "<i4", num_sequences, offset)
        offset += 4 * num_sequences
        self.sequence_pointers: np.ndarray = _view(self._idx, "<i8", num_sequences, offset)
        offset += 8 * num_sequences
        self.document_boundaries: np.ndarray = _view(self._idx, "<i8", num_indices, offset)
        self._bin = _map_bin(self.bin_path)
        self._check_bin_size()

    @property
    def num_sequences(self) -> int:
        """The number of sequences (Megatron's ``len(dataset)``)."""
        return int(self.sequence_lengths.size)

    @property
    def num_documents(self) -> int:
        """The number of documents: ``len(document_boundaries) - 1``."""
        return int(self.document_boundaries.size) - 1

    @property
    def num_tokens(self) -> int:
        """The total number of tokens over all sequences."""
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def __len__(self) -> int:
        """The number of sequences."""
        return self.num_sequences

    def sequence(self, i: int) -> np.ndarray:
        """The tokens of sequence ``i`` (0 <= i < num_sequences): a read-only view of ``.bin``."""
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence {i} out of range [0, {self.num_sequences})")
        pointer, length = int(self.sequence_pointers[i]), int(self.sequence_lengths[i])
        return _view(self._bin, self.dtype, length, pointer)

    def document(self, j: int) -> np.ndarray:
        """The tokens of document ``j`` (0 <= j < num_documents): its sequences concatenated.

        A view of ``.bin`` when those sequences are adjacent there (always, for files written by
        Megatron's builder), else a copy. An empty document gives an empty array.
        """
        if not 0 <= j < self.num_documents:
            raise IndexError(f"document {j} out of range [0, {self.num_documents})")
        start, stop = int(self.document_boundaries[j]), int(self.document_boundaries[j + 1])
        if start == stop:
            return np.empty(0, dtype=self.dtype)
        lengths = self.sequence_lengths[start:stop].astype(np.int64)
        pointers = self.sequence_pointers[start:stop]
        ends = pointers + lengths * self.dtype.itemsize
        if np.array_equal(pointers[1:], ends[:-1]):
            return _view(self._bin, self.dtype, int(lengths.sum()), int(pointers[0]))
        return np.concatenate([self.sequence(i) for i in range(start, stop)])

    def _check_bin_size(self) -> None:
        """Raise if ``.bin`` ends before the last sequence the index points at."""
        if self.num_sequences == 0:
            return
        last = self.num_sequences - 1
        pointer, length = int(self.sequence_pointers[last]), int(self.sequence_lengths[last])
        need = pointer + length * self.dtype.itemsize
        if self._bin.size < need:
            raise ValueError(
                f"{self.bin_path}: {self._bin.size} bytes, shorter than its index "
                f"{self.idx_path} says ({need} bytes); the .bin is truncated or belongs to "
                f"another index: {REGENERATE_HINT}"
            )


def _missing_hint(prefix: str) -> str:
    """How to name a Megatron dataset: by its prefix, without ``.idx``/``.bin``."""
    if prefix.endswith((".idx", ".bin")):
        return f"give the prefix without the extension ({prefix[:-4]!r}), not {prefix!r}"
    return f"a Megatron indexed dataset is PREFIX.idx + PREFIX.bin; check the prefix {prefix!r}"


def _read_header(idx_path: str) -> tuple[np.dtype, int, int]:
    """The checked (token dtype, sequence count, document-index count) of ``idx_path``."""
    with open(idx_path, "rb") as f:
        raw = f.read(HEADER.size)
    if raw[: len(MAGIC)] != MAGIC and not (len(raw) < len(MAGIC) and MAGIC.startswith(raw)):
        raise ValueError(
            f"{idx_path}: not a Megatron indexed-dataset index (starts with "
            f"{raw[: len(MAGIC)]!r}, expected {MAGIC!r}); point at a PREFIX.idx written by "
            "Megatron-LM"
        )
    if len(raw) < HEADER.size:
        raise ValueError(
            f"{idx_path}: truncated index ({len(raw)} bytes, the header alone is {HEADER.size}); "
            f"{REGENERATE_HINT}"
        )
    _, version, code, num_sequences, num_indices = HEADER.unpack(raw)
    if version != VERSION:
        raise ValueError(
            f"{idx_path}: index version {version}; this reader knows version {VERSION} only"
        )
    if code not in DTYPE_CODES:
        raise ValueError(
            f"{idx_path}: unknown token dtype code {code} (known: {sorted(DTYPE_CODES)}); "
            f"{REGENERATE_HINT}"
        )
    return DTYPE_CODES[code], num_sequences, num_indices


def _check_index_size(idx_path: str, size: int, num_sequences: int, num_indices: int) -> None:
    """Raise if the ``.idx`` is too short for its arrays or has no document indices."""
    need = HEADER.size + 12 * num_sequences + 8 * num_indices
    if size < need:
        raise ValueError(
            f"{idx_path}: truncated index ({size} bytes; its header announces {num_sequences} "
            f"sequences and {num_indices} document indices, {need} bytes); {REGENERATE_HINT}"
        )
    if num_indices == 0:
        raise ValueError(
            f"{idx_path}: no document indices (Megatron writes at least the leading 0); "
            f"{REGENERATE_HINT}"
        )


def _map_bin(bin_path: str) -> np.ndarray:
    """``bin_path`` memory-mapped read-only as bytes (an empty array for an empty file)."""
    if os.path.getsize(bin_path) == 0:  # mmap refuses empty files
        return np.empty(0, dtype=np.uint8)
    return np.memmap(bin_path, dtype=np.uint8, mode="r")


def _view(buffer: np.ndarray, dtype: Any, count: int, offset: int) -> np.ndarray:
    """``count`` items of ``dtype`` at byte ``offset`` of ``buffer``: a read-only view."""
    out = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
    out.flags.writeable = False
    return out
