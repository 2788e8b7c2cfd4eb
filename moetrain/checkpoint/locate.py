"""Which native checkpoint a directory a user named stands for, or one line saying why none.

A path given to ``checkpoint.resume``, ``checkpoint.init_from``, ``moetrain-convert --from``,
``moetrain-upcycle --from`` or ``moetrain.load_model`` is one of: a step directory
(``<run.dir>/checkpoints/<step>``), a run directory or its ``checkpoints/`` (the newest complete
checkpoint in it), or something else. The errors tell these apart: "not a checkpoint", "a run
with no checkpoint", "no complete checkpoint in this run" and "an incomplete save" (a step
directory without its ``checksums.json``) are different problems with different fixes, and each
names the setting or argument (``setting``) the path came from.
"""

from __future__ import annotations

import os
from pathlib import Path

from moetrain.checkpoint.checksums import CHECKSUMS, verify
from moetrain.checkpoint.errors import CheckpointError

TRAIN_STATE = "train_state.json"  # as moetrain.checkpoint.native writes it
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index file
RUN_FILES = ("config.yaml", "metrics.jsonl", "run.json")  # what a run directory holds


def is_step_dir(path: Path) -> bool:
    """Whether ``path`` looks like one native checkpoint (complete or not)."""
    return any((path / name).is_file() for name in (TRAIN_STATE, CHECKSUMS, DCP_METADATA))


def _steps(checkpoints: Path) -> list[Path]:
    """The step directories under ``checkpoints``, newest first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found, key=lambda p: int(p.name), reverse=True)


def _why(step: Path, deep: bool) -> str | None:
    """Why ``step`` cannot be loaded (None: it can); ``deep`` hashes its files, at most once per
    process (as the loaders' own check does)."""
    if not deep:
        return verify(step, hash_files=False)
    from moetrain.checkpoint.native import _verify_once

    return _verify_once(step)


def _accepted(hub: bool) -> str:
    hub_dir = ", or a Hugging Face hub directory (config.json)" if hub else ""
    return f"give a step directory (<run.dir>/checkpoints/<step>) or a run directory{hub_dir}"


def locate(path: str | os.PathLike, setting: str, hub: bool = False, deep: bool = True) -> Path:
    """The checkpoint directory ``path`` names: itself (a step directory) or the newest complete
    checkpoint of a run directory / its ``checkpoints/``. Raises :class:`CheckpointError`
    ``<setting>: <why>`` when there is none. ``hub``: the caller also reads hub directories
    (named in the fix). ``deep``: hash every file (else only the checksum file is checked, and
    the caller's later load verifies the rest). With a process group up, every rank must call
    it (the checks are collective, as :func:`~moetrain.checkpoint.native.find_latest`'s)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{setting}: {root} is not a directory; {_accepted(hub)}")
    if is_step_dir(root):
        why = _why(root, deep)
        if why is not None:
            raise CheckpointError(f"{setting}: {why}")
        return root
    checkpoints = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    steps = _steps(checkpoints)
    if steps:
        problems = []
        for step in steps:
            why = _why(step, deep)
            if why is None:
                return step
            problems.append(why)
        raise CheckpointError(
            f"{setting}: {root} holds no complete checkpoint ({len(steps)} incomplete or "
            f"damaged; the newest: {problems[0]}); give a complete step directory or another run"
        )
    if checkpoints != root or any((root / name).is_file() for name in RUN_FILES):
        raise CheckpointError(
            f"{setting}: {root} is a run directory with no checkpoint (the run stopped before "
            "its first save, or ran with checkpoint.final=false and no checkpoint.interval); give "
            "a run that saved one, or one of its step directories (<run.dir>/checkpoints/<step>)"
        )
    raise CheckpointError(
        f"{setting}: {root} is not a checkpoint (no {TRAIN_STATE}, no checkpoints/"
        f"{', no config.json' if hub else ''}); {_accepted(hub)}"
    )
