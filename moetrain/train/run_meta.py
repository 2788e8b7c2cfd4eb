"""What a run records about itself (``<run.dir>/run_meta.json``) and reads back at its end.

``run_meta.json`` is written by the logging rank at every start (a resumed run rewrites it):
versions, the git commit of the working directory's repository (best effort: null without git
or outside a repository), the command line, the resolved layout (``layout``: the phrase and
every mesh degree), corpus, parameter counts, FLOPs per token, the peak FLOP/s MFU divides by
with its source and measured repetitions, the set-up memory peak, and where the run resumed from.

The end-of-run summary reports the run's first and last validation loss across resumes: the
earlier processes' values are read back from ``metrics.jsonl`` (:func:`val_history`).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from moetrain.train.trainer import Trainer

RUN_META = "run_meta.json"


def git_commit(cwd: Path | None = None) -> dict[str, Any] | None:
    """``{"commit": <sha>, "dirty": <tracked files changed>}`` of the git repository holding
    ``cwd`` (default: the working directory); None without git, outside a repository, or when
    git fails. Never raises."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty} if commit else None


def layout_meta(trainer: Trainer) -> dict[str, Any]:
    """The resolved layout: ``ParallelDims.describe()``, the expert placement's phrase, and
    every mesh degree (``ParallelDims.layout``)."""
    dims = trainer.ctx.dims
    return {
        "describe": dims.describe(),
        "experts": trainer.placement.describe(dims),
        "degrees": dims.layout(trainer.cfg.parallel.pp_virtual_stages),
        "backend": trainer.ctx.backend,
    }


def run_metadata(trainer: Trainer) -> dict[str, Any]:
    """The contents of ``run_meta.json`` for this start of ``trainer``'s run."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": git_commit(),
        "command": list(sys.argv),
        "layout": layout_meta(trainer),
        "data": trainer.data_meta,
        "params_total": trainer.num_params,
        "params_active": trainer.num_active_params,
        "world_size": trainer.ctx.dims.world_size,
        "flops_per_token": trainer.flops_per_token,
        **trainer.peak.as_meta(),
        "setup_memory": trainer.setup_memory,
        "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None,
        "start_step": trainer.step,
    }


def write_run_meta(trainer: Trainer) -> Path:
    path = trainer.run_dir / RUN_META
    path.write_text(json.dumps(run_metadata(trainer), indent=2, default=str))
    return path


def val_history(metrics_path: Path) -> list[tuple[int, float]]:
    """Every ``(step, val_loss)`` row of a ``metrics.jsonl``, in file order (a resumed run
    keeps the earlier process's rows up to its checkpoint); unreadable lines are skipped."""
    if not metrics_path.is_file():
        return []
    found = []
    for line in metrics_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if isinstance(row, dict) and "val_loss" in row:
            found.append((int(row.get("step", 0)), float(row["val_loss"])))
    return found
