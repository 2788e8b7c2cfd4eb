"""Directories that appear complete or not at all: built under a temporary name beside the
destination, flushed to disk, then renamed. An interrupted write never leaves a directory that
looks loadable, only a ``.tmp-`` one that the next attempt removes."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

from moetrain.checkpoint.errors import CheckpointError

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Flush ``path``'s entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before the folders holding them
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; when the block ends without an exception its
    contents are flushed and it is renamed to ``path``, otherwise it is removed. ``path`` must
    not exist or be an empty directory (a :class:`CheckpointError` otherwise, before anything is
    written)."""
    dest = Path(path)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CheckpointError(f"{dest} exists and is not empty; give a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # the pid keeps two processes writing the same destination out of each other's way
    tmp = dest.parent / f"{TMP_PREFIX}{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_files(root: Path, files: Mapping[str, str] | None) -> None:
    """Write ``files`` (path relative to ``root`` -> text, as UTF-8) under ``root``, creating
    folders."""
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
