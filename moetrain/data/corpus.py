"""The built-in corpus: the Python standard library's ``.py`` sources on this machine.

Found at run time under ``sysconfig.get_paths()["stdlib"]`` (no download, nothing cached on
disk), skipping ``site-packages``/``dist-packages`` subtrees (installed third-party code) and
``__pycache__``. Files are listed by their path relative to the stdlib root, as sorted POSIX
strings, so the order is the same on every machine.

Split rule: a file is in ``val`` iff ``int(sha256(relative_path)[:8], 16) % 10000 <
round(val_fraction * 10000)``, else in ``train``. It depends only on the relative path, so the
split is the same on every machine with the same Python version, and a file never moves
between splits when other files are added or removed.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from typing import Any, Optional

import numpy as np

from moetrain.data.tokenizer import Tokenizer

SPLITS = ("train", "val")
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> str:
    """The directory of this interpreter's standard library."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: Optional[str] = None) -> list[str]:
    """Relative POSIX paths of the ``.py`` files under ``root`` (default: the stdlib), sorted.

    ``site-packages``, ``dist-packages`` and ``__pycache__`` directories are pruned at any depth.
    """
    root = root or stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py"):
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def is_val(rel_path: str, val_fraction: float) -> bool:
    """Whether the file at ``rel_path`` (relative POSIX path) belongs to the val split."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 10000 < round(val_fraction * 10000)


def split_files(split: str, val_fraction: float, root: Optional[str] = None) -> list[str]:
    """The sorted relative paths of ``split`` ("train" or "val")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    want_val = split == "val"
    return [p for p in stdlib_files(root) if is_val(p, val_fraction) == want_val]


def read_documents(rel_paths: list[str], root: Optional[str] = None) -> list[str]:
    """The texts of ``rel_paths`` under ``root``, decoded as UTF-8 (``errors="replace"``).

    A few stdlib test files are deliberately not UTF-8; replacing keeps them readable by any
    tokenizer without changing the file list.
    """
    root = root or stdlib_root()
    texts = []
    for rel in rel_paths:
        with open(os.path.join(root, rel), "rb") as f:
            texts.append(f.read().decode("utf-8", errors="replace"))
    return texts


def load_stdlib_tokens(
    split: str, tokenizer: Tokenizer, val_fraction: float, root: Optional[str] = None
) -> np.ndarray:
    """The token array of one split: its files in sorted order, each followed by ``eos``.

    Returns a 1-D array, uint16 when ``tokenizer.vocab_size <= 65536`` else uint32.
    """
    texts = read_documents(split_files(split, val_fraction, root), root)
    return tokenizer.encode_documents(texts)


def corpus_metadata(val_fraction: float, root: Optional[str] = None) -> dict[str, Any]:
    """What the run records about the corpus: Python version, root, files and bytes per split."""
    root = root or stdlib_root()
    meta: dict[str, Any] = {
        "source": "stdlib",
        "python_version": platform.python_version(),
        "stdlib_root": root,
        "val_fraction": val_fraction,
    }
    files = stdlib_files(root)
    for split in SPLITS:
        chosen = [p for p in files if is_val(p, val_fraction) == (split == "val")]
        meta[f"{split}_files"] = len(chosen)
        meta[f"{split}_bytes"] = sum(os.path.getsize(os.path.join(root, p)) for p in chosen)
    return meta
