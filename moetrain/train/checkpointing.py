"""The trainer's checkpoint I/O: saves (at ``checkpoint.interval`` and, with
``checkpoint.final``, after the last step), resume and ``checkpoint.init_from``, each announced
by the logging rank in one line with its duration."""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from moetrain import checkpoint
from moetrain.checkpoint.errors import CheckpointError
from moetrain.parallel import activity
from moetrain.train.lr import load_scheduler_state, scheduler_state
from moetrain.train.nonfinite import NonFiniteError

if TYPE_CHECKING:
    from moetrain.train.trainer import Trainer

# torch.distributed.checkpoint without a process group (one process) warns once per save/load
SINGLE_PROCESS_WARNING = (
    r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to "
    r"(save|load) in a single process"
)


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """Silence torch's "assuming the intent is to save/load in a single process" warning: in one
    process that is the intent. Other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING, category=UserWarning)
        yield


def announce(logging_rank: bool, message: str) -> None:
    """``moetrain: <message>`` on stdout from the logging rank (above a progress bar)."""
    if logging_rank:
        tqdm.write(f"moetrain: {message}")
        sys.stdout.flush()


def save(trainer: Trainer) -> Path:
    """Checkpoint the state after ``trainer.step`` steps (every rank calls this). Weights that
    are not finite are never saved: ``NonFiniteError`` instead."""
    cfg, t = trainer.cfg, trainer.cfg.train
    begin = time.perf_counter()
    activity.set_phase("checkpoint save")
    bad_rank = trainer.pm.first_rank_with_nonfinite_weights()
    if bad_rank is not None:
        raise NonFiniteError(
            f"step {trainer.step}: non-finite weights first seen on rank {bad_rank}; no "
            "checkpoint written (the latest complete one stays latest); lower optim.lr or "
            "keep train.grad_clip on"
        )
    train_state = {
        "step": trainer.step,
        "tokens_seen": trainer.step * t.global_batch_size * t.seq_len,
        "scheduler": scheduler_state(trainer.scheduler),
        "sampler": trainer.train_batches.state_dict(),
        "wandb_run_id": trainer.wandb_run_id,
        "layout": trainer._layout(),
        "config": OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
    }
    with single_process_quiet():
        path = checkpoint.save(
            trainer.checkpoints_dir,
            trainer.step,
            trainer.state_module,
            trainer.optimizer,
            train_state,
            cfg.checkpoint.keep_last,
        )
    trainer.last_checkpoint, trainer.last_checkpoint_step = path, trainer.step
    seconds = time.perf_counter() - begin
    announce(trainer.ctx.is_logging_rank, f"checkpoint saved: {path} ({seconds:.2f} s)")
    return path


def resume(trainer: Trainer) -> Path | None:
    """Load the checkpoint ``checkpoint.resume`` names (auto: the newest complete one in the
    run dir, if any) and continue from its step."""
    how = trainer.cfg.checkpoint.resume
    if how == "never" or trainer.resumed_from is not None:
        return None
    path = checkpoint.find_latest(trainer.checkpoints_dir) if how == "auto" else Path(how)
    if path is None:
        return None
    begin = time.perf_counter()
    activity.set_phase("checkpoint load")
    state = checkpoint.native.read_train_state(path)
    try:  # first: a data mismatch (another mixture) stops before any weights are read
        trainer.train_batches.load_state_dict(state["sampler"])
    except ValueError as err:
        raise CheckpointError(f"checkpoint.resume: {path}: {err}") from err
    same_layout = is_same_layout(state.get("layout"), trainer._layout())
    with single_process_quiet():
        checkpoint.load(path, trainer.state_module, trainer.optimizer, same_layout)
    trainer.step = int(state["step"])
    load_scheduler_state(trainer.scheduler, state["scheduler"])
    trainer.wandb_run_id = state.get("wandb_run_id")
    if not same_layout:  # per-rank RNG streams are re-derived from the seed and step
        torch.manual_seed(trainer.cfg.train.seed + trainer.step + 1_000_003 * trainer.ctx.rank)
    trainer.resumed_from = path
    trainer.last_checkpoint, trainer.last_checkpoint_step = path, trainer.step
    seconds = time.perf_counter() - begin
    announce(
        trainer.ctx.is_logging_rank,
        f"resumed from {path} (step {trainer.step}, {seconds:.2f} s)",
    )
    return path


def is_same_layout(saved: Any, current: dict) -> bool:
    """Whether a checkpoint's recorded layout is ``current`` (then per-rank state is restored
    exactly); a layout written before context parallelism existed had cp 1."""
    if isinstance(saved, dict):
        saved = {"cp": 1, **saved}
    return saved == current


def init_from(trainer: Trainer, path: str) -> None:
    """``checkpoint.init_from``: model weights only into the freshly built model."""
    begin = time.perf_counter()
    with single_process_quiet():
        checkpoint.load_weights(Path(path), trainer.state_module, trainer.cfg.model)
    seconds = time.perf_counter() - begin
    announce(
        trainer.ctx.is_logging_rank,
        f"weights loaded from {path} (checkpoint.init_from, {seconds:.2f} s)",
    )
