"""Writer of Megatron-LM indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``, MMIDIDX version 1).

The layout is the one ``moetrain.data.megatron_indexed`` reads (documented there); each document
is one sequence, so ``document_indices`` is ``0, 1, ..., num_sequences``. Token dtype: uint16
(code 8) when the vocabulary has at most 65,536 ids, else int32 (code 4).

``MegatronWriter`` streams: tokens go to a temporary ``.bin`` in the prefix's directory and the
sequence lengths to a temporary side file, so memory does not grow with the corpus; ``commit``
builds the ``.idx`` from the side file in slices, removes an old ``PREFIX.idx``, then renames
``.bin`` and last ``.idx`` into place (an ``.idx`` is never left beside tokens it does not
describe). Leaving the context without ``commit`` removes the temporary files.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from moetrain.data.megatron_indexed import DTYPE_CODES, HEADER, MAGIC, VERSION

_SLICE = 1 << 20  # index entries converted at a time in commit (bounded memory)
_INT32_MAX = np.iinfo(np.int32).max


def megatron_dtype(vocab_size: int) -> tuple[np.dtype, int]:
    """The token dtype and its MMIDIDX code: uint16 (8) up to 65,536 ids, else int32 (4)."""
    code = 8 if vocab_size <= 65536 else 4
    if vocab_size > _INT32_MAX + 1:
        raise ValueError(f"vocab_size {vocab_size} does not fit Megatron's int32 tokens")
    return DTYPE_CODES[code], code


class MegatronWriter:
    """Streams documents into ``prefix.bin``/``prefix.idx`` for a ``vocab_size`` vocabulary."""

    def __init__(self, prefix: str, vocab_size: int) -> None:
        self.prefix = prefix
        self.dtype, self.code = megatron_dtype(vocab_size)
        self.num_tokens = 0
        self.num_documents = 0
        directory = os.path.dirname(os.path.abspath(prefix))
        base = os.path.basename(prefix)
        self._tmp: dict[str, str] = {}
        self._files: dict[str, Any] = {}
        try:
            for part in ("bin", "lengths"):
                fd, self._tmp[part] = tempfile.mkstemp(prefix=f".{base}.{part}.", dir=directory)
                self._files[part] = os.fdopen(fd, "wb")
        except BaseException:
            self._cleanup()
            raise

    def __enter__(self) -> MegatronWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cleanup()

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: ``tokens`` back to back, ``lengths[i]`` tokens (eos included) each."""
        assert self._files, "write after commit"
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size and int(lengths.max()) > _INT32_MAX:
            raise ValueError(f"a document of {int(lengths.max())} tokens exceeds Megatron's int32")
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())}, not {len(tokens)} tokens")
        self._files["bin"].write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._files["lengths"].write(lengths.astype("<i4").tobytes())
        self.num_tokens += len(tokens)
        self.num_documents += int(lengths.size)

    def commit(self) -> None:
        """Write the index and put ``prefix.bin`` then ``prefix.idx`` in place."""
        assert self._files, "commit twice"
        for f in self._files.values():
            f.close()
        self._files = {}
        fd, self._tmp["idx"] = tempfile.mkstemp(
            prefix=f".{os.path.basename(self.prefix)}.idx.", dir=os.path.dirname(self._tmp["bin"])
        )
        with os.fdopen(fd, "wb") as idx:
            self._write_index(idx)
            idx.flush()
            os.fsync(idx.fileno())
        with open(self._tmp["bin"], "rb+") as f:
            os.fsync(f.fileno())
        if os.path.exists(self.prefix + ".idx"):
            os.unlink(self.prefix + ".idx")  # no stale index beside new tokens if we stop between
        for part in ("bin", "idx"):
            os.chmod(self._tmp[part], 0o644)  # mkstemp creates 0600
            os.replace(self._tmp.pop(part), f"{self.prefix}.{part}")
        self._cleanup()

    def _write_index(self, idx: Any) -> None:
        """Header, lengths, byte pointers and document indices, a slice at a time."""
        count = self.num_documents
        idx.write(HEADER.pack(MAGIC, VERSION, self.code, count, count + 1))
        lengths = np.memmap(self._tmp["lengths"], "<i4", "r") if count else np.empty(0, "<i4")
        for start in range(0, count, _SLICE):
            idx.write(np.asarray(lengths[start : start + _SLICE]).tobytes())
        pointer = 0
        for start in range(0, count, _SLICE):
            nbytes = lengths[start : start + _SLICE].astype(np.int64) * self.dtype.itemsize
            ends = np.cumsum(nbytes) + pointer
            idx.write((ends - nbytes).astype("<i8").tobytes())
            pointer = int(ends[-1])
        for start in range(0, count + 1, _SLICE):
            idx.write(np.arange(start, min(start + _SLICE, count + 1), dtype="<i8").tobytes())
        del lengths  # close the memory map before the side file is removed

    def _cleanup(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
        for path in self._tmp.values():
            if os.path.exists(path):
                os.unlink(path)
        self._tmp = {}


def megatron_paths(prefix: str) -> tuple[str, str]:
    """``(prefix.bin, prefix.idx)``."""
    return prefix + ".bin", prefix + ".idx"


def check_prefix(prefix: str, force: bool) -> None:
    """Raise ``ValueError`` if ``prefix`` cannot take a new dataset: it ends in ``.bin``/``.idx``,
    or its files exist (without ``force``, or as directories)."""
    if prefix.endswith((".bin", ".idx")):
        raise ValueError(
            f"--output {prefix!r}: give the prefix without .bin/.idx ({prefix[:-4]!r})"
        )
    existing = [p for p in megatron_paths(prefix) if os.path.exists(p)]
    for path in existing:
        if os.path.isdir(path):
            raise ValueError(f"--output {prefix!r}: {path} is a directory; choose another prefix")
    if existing and not force:
        raise ValueError(
            f"--output {prefix!r}: {', '.join(existing)} exist; pass --force to overwrite, or "
            "choose a new prefix"
        )
