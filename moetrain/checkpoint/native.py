"""Native checkpoints: ``<run.dir>/checkpoints/<step>/``, written atomically, layout-independent.

One checkpoint directory holds

- the model and optimizer state (DTensors and plain tensors keyed by the full model's parameter
  names), written with ``torch.distributed.checkpoint`` by every rank: a checkpoint saved at one
  layout loads at any other;
- ``train_state.json``: step, tokens seen, LR-scheduler state, data-sampler position, wandb run
  id, the layout it was saved at — JSON, never unpickled;
- ``rng/rank<k>.json``: each rank's python, numpy and torch RNG states (JSON);
- ``checksums.json``: SHA-256 of every other file, written last.

Atomicity: every rank writes under ``checkpoints/.tmp-<step>/``; after a barrier rank 0 writes the
checksums, renames the directory to ``<step>`` and then replaces the ``latest`` pointer (a file
holding the step's directory name). A directory without checksums, or whose files do not match
them, is incomplete or corrupt: :func:`find_latest` skips it with a warning naming it. Each
checkpoint's files are hashed once per process, shared out over the ranks
(:mod:`moetrain.checkpoint.checksums`): :func:`find_latest`, :func:`load`,
:func:`read_train_state` and :func:`load_model_weights` are collective when a process group is
up. Loads read only the stored chunks that overlap this rank's shards (counted in
:func:`~moetrain.checkpoint.io_stats.bytes_read`).
Native checkpoints use torch's distributed-checkpoint metadata (pickled): load only those you
trust.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.futures import Future

from moetrain.checkpoint.atomic import TMP_PREFIX, atomic_dir, fsync_dir, write_text_files
from moetrain.checkpoint.build import FRESH_STATE, empty_model
from moetrain.checkpoint.checksums import CHECKSUMS, checksums, verify
from moetrain.checkpoint.errors import CheckpointError
from moetrain.checkpoint.io_stats import add_bytes_read

if TYPE_CHECKING:
    from moetrain.models import Transformer

TRAIN_STATE = "train_state.json"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"{step:08d}"


@contextlib.contextmanager
def _single_process_ok():
    """torch warns that a distributed-checkpoint call without a process group "assumes the intent
    is to save/load in a single process": in a single process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _CountingReader(FileSystemReader):
    """torch's file-system reader that adds what it reads to
    :func:`~moetrain.checkpoint.io_stats.bytes_read`: the byte range of every stored chunk a
    load plan asks for (DCP reads whole chunks, so a chunk saved at another layout counts whole
    when this rank needs any of it) and the ``.metadata`` file where it is read."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = super().read_metadata(*args, **kwargs)
        file = Path(self.path) / ".metadata"
        if file.is_file():  # per-rank metadata files (modes moetrain does not use): not counted
            add_bytes_read(file.stat().st_size)
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        add_bytes_read(sum(self.storage_data[item.storage_index].length for item in plan.items))
        return super().read_data(plan, planner)


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    """Load ``state`` in place from checkpoint ``path``. ``state`` holds this rank's shards
    (DTensors; the default, non-full state dicts), so each rank reads only the stored chunks that
    overlap what it holds."""
    dcp.load(state, storage_reader=_CountingReader(path))


# --- RNG states as JSON ----------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# --- model and optimizer state -----------------------------------------------------------------


def app_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(state to save or load, the optimizer's current param groups). The state is the model's
    and the optimizer's per-parameter tensors keyed by parameter names, sharded as the model is.
    Param groups are not saved: their hyperparameters come from the config, and how parameters
    are grouped depends on the layout (groups are split by device mesh)."""
    if optimizer is None:
        return {"model": get_model_state_dict(model)}, []
    model_sd, optim_sd = get_state_dict(model, optimizer)
    groups = cast(list[dict[str, Any]], optim_sd["param_groups"])
    return {"model": model_sd, "optim": {"state": optim_sd["state"]}}, groups


def save(
    checkpoints_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` (every rank calls this). Returns its final directory."""
    final = checkpoints_dir / step_dir_name(step)
    tmp = checkpoints_dir / f"{TMP_PREFIX}{step_dir_name(step)}"
    if _rank() == 0:
        if tmp.exists():  # left by a run killed while saving
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(app_state(model, optimizer)[0], checkpoint_id=str(tmp))
    _write_json(tmp / "rng" / f"rank{_rank()}.json", rng_state())
    _barrier()
    if _rank() == 0:
        _write_json(tmp / TRAIN_STATE, train_state)
        _write_json(tmp / CHECKSUMS, checksums(tmp))
        if final.exists():  # the same step saved again (a restart): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(checkpoints_dir)
        pointer = checkpoints_dir / (LATEST + ".part")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, checkpoints_dir / LATEST)
        fsync_dir(checkpoints_dir)
        _prune(checkpoints_dir, keep_last, keep=final.name)
    _barrier()
    return final


def _prune(checkpoints_dir: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    steps = sorted(p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.isdigit())
    for old in steps[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


# Checkpoints this process has verified, keyed by their checksum file's identity (a checkpoint
# saved again under the same name is verified afresh). A resume reads one checkpoint through
# find_latest, read_train_state and load on every rank; hashing it each time tripled its cost.
_verified: set[tuple[str, int, int]] = set()


def _identity(path: Path) -> tuple[str, int, int] | None:
    try:
        stat = (path / CHECKSUMS).stat()
    except OSError:
        return None
    return str(path.resolve()), stat.st_ino, stat.st_mtime_ns


def _verify_once(path: Path) -> str | None:
    """:func:`~moetrain.checkpoint.checksums.verify`, without hashing again on a rank that has
    already found this checkpoint intact. Still one all-reduce with a process group: whether a
    rank hashes is its own business, the verdict is collective (no rank may skip the call)."""
    key = _identity(path)
    why = verify(path, hash_files=key is None or key not in _verified)
    if why is None and key is not None:
        _verified.add(key)
    return why


def _require_intact(path: Path, setting: str) -> None:
    """Raise a :class:`CheckpointError` naming ``setting`` and the bad file unless checkpoint
    ``path`` is complete and intact (verified at most once per process)."""
    why = _verify_once(path)
    if why is not None:
        raise CheckpointError(f"{setting}: {why}")


def find_latest(checkpoints_dir: Path) -> Path | None:
    """The newest complete, intact checkpoint under ``checkpoints_dir`` (others are skipped with
    a warning naming them). Collective with a process group: every rank calls it and gets the
    same answer."""
    if not checkpoints_dir.is_dir():
        return None
    steps = sorted(
        (p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True
    )
    for path in steps:
        why = _verify_once(path)
        if why is None:
            return path
        warnings.warn(f"skipping checkpoint {why}", stacklevel=2)
    return None


def load(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    same_layout: bool,
) -> dict[str, Any]:
    """Load checkpoint ``path`` into ``model`` (and ``optimizer``); restore this rank's RNG
    states when the layout is the one it was saved at. Returns the train state."""
    _require_intact(path, "checkpoint.resume")
    if optimizer is not None and json.loads((path / TRAIN_STATE).read_text()).get("weights_only"):
        raise CheckpointError(
            f"checkpoint.resume: {path} holds model weights only (no optimizer or data state; "
            "written by moetrain-convert); start from it with checkpoint.init_from instead"
        )
    state, param_groups = app_state(model, optimizer)
    _dcp_load(state, path)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        optim_sd = {"state": state["optim"]["state"], "param_groups": param_groups}
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_sd)
    rng_file = path / "rng" / f"rank{_rank()}.json"
    if same_layout and rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    return json.loads((path / TRAIN_STATE).read_text())


def read_train_state(path: Path) -> dict[str, Any]:
    _require_intact(path, "checkpoint.resume")
    return json.loads((path / TRAIN_STATE).read_text())


def load_model_weights(path: Path, model: nn.Module) -> None:
    """``checkpoint.init_from`` for a native checkpoint: model weights only, any layout."""
    _require_intact(path, "checkpoint.init_from")
    state = {"model": get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))}
    # training state a checkpoint of another config may lack keeps its initial value
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    fresh = [k for k in state["model"] if k.endswith(FRESH_STATE) and f"model.{k}" not in saved]
    for key in fresh:
        del state["model"][key]
    with _single_process_ok():
        _dcp_load(state, path)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not fresh))


def load_native_model(path: str | os.PathLike, setting: str = "load_model") -> Transformer:
    """An eval-ready :class:`moetrain.models.Transformer` from a native checkpoint saved at any
    layout (a step directory, or a run directory: its newest complete checkpoint). No process
    group needed. Hub directories: :func:`moetrain.checkpoint.source.load_model`. ``setting``:
    the argument ``path`` came from, named by the error when it holds no checkpoint."""
    from omegaconf import OmegaConf

    from moetrain.checkpoint.locate import locate
    from moetrain.models import ModelConfig

    ckpt = locate(path, setting, hub=True)
    state = json.loads((ckpt / TRAIN_STATE).read_text())
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), state["config"]["model"])
    model = empty_model(OmegaConf.to_object(model_cfg))  # type: ignore[arg-type]
    load_model_weights(ckpt, model)  # every saved tensor: the checkpoint fills it all
    return model.eval()


def save_model(
    model: Transformer, path: str | os.PathLike, extra_files: dict[str, str] | None = None
) -> Path:
    """Write a single-process model as a weights-only native checkpoint at ``path`` (a new
    directory): what ``checkpoint.init_from`` and :func:`load_native_model` read, with the model
    config in ``train_state.json`` (``extra_files``: more text files, relative path -> text,
    covered by the checksums). Atomic: see :func:`moetrain.checkpoint.atomic.atomic_dir`."""
    with atomic_dir(path) as tmp:
        with _single_process_ok():
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp))
        cfg = dataclasses.asdict(model.cfg)
        _write_json(tmp / TRAIN_STATE, {"step": 0, "weights_only": True, "config": {"model": cfg}})
        write_text_files(tmp, extra_files)
        _write_json(tmp / CHECKSUMS, checksums(tmp))
    return Path(path)
