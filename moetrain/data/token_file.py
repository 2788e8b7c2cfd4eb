"""The prepared-token directory format (version 1): ``tokens.bin`` + ``meta.json``.

``tokens.bin`` holds raw little-endian unsigned integers (``meta["dtype"]``: ``"uint16"`` when
the vocabulary has at most 65,536 ids, else ``"uint32"``), every document followed by
``meta["eos_id"]``, no header. ``meta.json`` holds ``{"format": 1, "dtype", "num_tokens",
"num_documents", "vocab_size", "tokenizer", "eos_id"}``.

``TokenDirWriter`` writes both atomically: tokens stream to a temporary file in the directory,
then ``os.replace`` puts ``tokens.bin`` and then ``meta.json`` in place. ``meta.json`` is the
completion mark: it is removed first when overwriting and written last, so a directory with a
``meta.json`` whose ``num_tokens`` matches the size of ``tokens.bin`` is complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

import numpy as np

from moetrain.data.tokenizer import Tokenizer, token_dtype

FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
META_FILE = "meta.json"
META_KEYS = ("format", "dtype", "num_tokens", "num_documents", "vocab_size", "tokenizer", "eos_id")
DTYPES: dict[str, np.dtype] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def read_meta(path: str) -> dict[str, Any]:
    """The checked ``meta.json`` of the prepared directory ``path``.

    Raises ``FileNotFoundError`` (no ``meta.json``) or ``ValueError`` (unreadable, wrong format
    version, missing keys, unknown dtype), each naming ``data.path`` and the file.
    """
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"data.path: {meta_path} not found; {path!r} is not a complete prepared directory "
            "(re-run `python -m moetrain.data.prepare ... --output DIR --force`)"
        )
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"data.path: cannot read {meta_path}: {err}") from err
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"data.path: {meta_path} lacks {', '.join(missing)}; re-run prepare")
    if meta["format"] != FORMAT_VERSION:
        raise ValueError(
            f"data.path: {meta_path} has format {meta['format']!r}; this moetrain reads format "
            f"{FORMAT_VERSION}; re-run prepare with this version"
        )
    if meta["dtype"] not in DTYPES:
        raise ValueError(f"data.path: {meta_path} has unknown dtype {meta['dtype']!r}")
    return meta


class TokenDirWriter:
    """Streams token arrays into ``out_dir/tokens.bin`` and writes ``meta.json`` on ``commit``.

    Use as a context manager: leaving the block without ``commit()`` (e.g. on an error)
    removes the temporary file and leaves the directory's previous contents untouched.
    """

    def __init__(self, out_dir: str, tokenizer: Tokenizer) -> None:
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.tokenizer = tokenizer
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.eos_id = tokenizer.require_eos()
        self.num_tokens = 0
        self.num_documents = 0
        fd, self._tmp_path = tempfile.mkstemp(prefix=f".{TOKENS_FILE}.", dir=out_dir)
        self._file: Optional[Any] = os.fdopen(fd, "wb")

    def __enter__(self) -> TokenDirWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            os.unlink(self._tmp_path)

    def write(self, tokens: np.ndarray, num_documents: int) -> None:
        """Append ``tokens`` (already ending each of its ``num_documents`` with eos)."""
        assert self._file is not None, "write after commit"
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.num_tokens += len(tokens)
        self.num_documents += num_documents

    def commit(self) -> dict[str, Any]:
        """Put ``tokens.bin`` and then ``meta.json`` in place; return the meta."""
        assert self._file is not None, "commit twice"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        meta = {
            "format": FORMAT_VERSION,
            "dtype": "uint16" if self.dtype.itemsize == 2 else "uint32",
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "vocab_size": self.tokenizer.vocab_size,
            "tokenizer": self.tokenizer.name,
            "eos_id": self.eos_id,
        }
        meta_path = os.path.join(self.out_dir, META_FILE)
        if os.path.exists(meta_path):
            os.unlink(meta_path)  # no stale meta beside new tokens if we stop in between
        os.chmod(self._tmp_path, 0o644)  # mkstemp creates 0600
        os.replace(self._tmp_path, os.path.join(self.out_dir, TOKENS_FILE))
        fd, tmp_meta = tempfile.mkstemp(prefix=f".{META_FILE}.", dir=self.out_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        os.chmod(tmp_meta, 0o644)
        os.replace(tmp_meta, meta_path)
        return meta
