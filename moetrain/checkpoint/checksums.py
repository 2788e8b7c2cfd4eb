"""A native checkpoint's ``checksums.json`` (SHA-256 of every other file): written last by the
save, verified before a load.

Verification is shared out when a process group of more than one rank is up: rank r hashes the
files r, r + N, r + 2N, ... (in name order) and one all-reduce (MIN over a verdict code) gives
every rank the same verdict, naming the first bad file, so all ranks accept or skip the same
checkpoint. Every rank must then call it at the same point. In one process every file is hashed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

CHECKSUMS = "checksums.json"

# verdict codes, the smallest over the ranks wins: the checksum file absent, unreadable, then
# per listed file i (name order) 2 + 2i missing, 3 + 2i another hash; _OK when nothing is wrong
_NO_SUMS, _UNREADABLE, _OK = 0, 1, 2**62


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files(root: Path) -> list[Path]:
    """The files under ``root`` the checksums cover (all but the checksum file)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def checksums(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root`` but the checksum file."""
    return {str(p.relative_to(root)): sha256(p) for p in files(root)}


def _group() -> tuple[int, int]:
    """(this rank, ranks) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _min_over_ranks(code: int) -> int:
    if _group()[1] == 1:
        return code
    # NCCL reduces device tensors only; gloo (and cpu:gloo,cuda:nccl) takes CPU ones
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    value = torch.tensor([code], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


def _listed(path: Path) -> tuple[list[tuple[str, str]], int]:
    """((name, digest) pairs in name order, _OK), or ([], the code of what is wrong)."""
    sums_path = path / CHECKSUMS
    if not sums_path.is_file():
        return [], _NO_SUMS
    try:
        sums = json.loads(sums_path.read_text())
    except (OSError, ValueError):
        return [], _UNREADABLE
    if not isinstance(sums, dict):
        return [], _UNREADABLE
    return sorted(sums.items()), _OK


def _first_bad(path: Path, listed: list[tuple[str, str]], rank: int, world: int) -> int:
    """The code of the first bad file among this rank's share (files rank, rank + world, ...)."""
    for i in range(rank, len(listed), world):
        name, digest = listed[i]
        file = path / name
        if not file.is_file():
            return 2 + 2 * i
        if sha256(file) != digest:
            return 3 + 2 * i
    return _OK


def _describe(path: Path, listed: list[tuple[str, str]], code: int) -> str | None:
    if code == _OK:
        return None
    if code == _NO_SUMS:
        return f"{path}: incomplete (no {CHECKSUMS}; the save did not finish)"
    if code == _UNREADABLE:
        return f"{path / CHECKSUMS}: unreadable"
    file = path / listed[(code - 2) // 2][0]
    return f"{file}: missing" if code % 2 == 0 else (
        f"{file}: checksum mismatch (truncated or corrupted)"
    )  # fmt: skip


def verify(path: Path, hash_files: bool = True) -> str | None:
    """Why checkpoint directory ``path`` cannot be loaded (None when it is complete and intact),
    the same on every rank. Collective when a process group of more than one rank is up (see the
    module docstring). ``hash_files=False``: this rank contributes only the checks of the
    checksum file (it has verified its share of this checkpoint before)."""
    rank, world = _group()
    listed, code = _listed(path)
    if code == _OK and hash_files:
        code = _first_bad(path, listed, rank, world)
    # a rank that found the checksum file bad has the smallest code: the others' names suffice
    return _describe(path, listed, _min_over_ranks(code))
