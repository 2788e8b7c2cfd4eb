"""Experiment tracking: wandb, offline by default (no account, no network needed), and
TensorBoard scalars when ``logging.tensorboard`` is on (``moetrain.train.tensorboard``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moetrain.train.tensorboard import TensorBoardWriter


class Tracker:
    """Thin wandb wrapper; ``mode='disabled'`` makes every call a no-op without importing wandb."""

    def __init__(
        self,
        mode: str,
        project: str,
        entity: str | None,
        run_dir: Path,
        config: dict,
        run_id: str | None = None,
        tensorboard: TensorBoardWriter | None = None,  # also gets every logged row
    ) -> None:
        self.run: Any = None
        self.tensorboard = tensorboard
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                f"logging.wandb.mode={mode} needs wandb: pip install wandb "
                "(or set logging.wandb.mode=disabled)"
            ) from err
        self.run = wandb.init(
            mode=mode,  # type: ignore[arg-type]  # validated: online | offline | disabled
            project=project,
            entity=entity,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
            # no ~30-line history/summary footer at finish: the run's files keep it
            settings=wandb.Settings(quiet=True),
        )

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, row: dict, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.write(row)
        if self.run is None:
            return
        flat = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        for key in ("dead_experts", "dropped_frac_by_position"):
            for i, value in enumerate(row.get(key, [])):
                flat[f"{key}/{i}"] = value
        for i, shares in enumerate(row.get("expert_load", [])):
            for e, share in enumerate(shares):
                flat[f"expert_load/layer{i}/expert{e}"] = share
        self.run.log(flat, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.run is not None:
            self.run.finish()
