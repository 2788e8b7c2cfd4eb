"""Experiment tracking: wandb, offline by default (no account, no network needed), and the
expert-load heatmap saved beside the metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
    ) -> None:
        self.run: Any = None
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
        )

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, row: dict, step: int) -> None:
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
        if self.run is not None:
            self.run.finish()


def save_expert_load_heatmap(steps: list[int], loads: list[list[list[float]]], path: Path) -> bool:
    """One panel per MoE layer: expert share of assignments (color) over steps (x) and experts
    (y). ``loads[t][layer][expert]``. Returns False when there is nothing to plot (dense)."""
    if not loads or not loads[0]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    num_layers = len(loads[0])
    fig, axes = plt.subplots(num_layers, 1, figsize=(8, 1.8 * num_layers + 0.6), squeeze=False)
    for i in range(num_layers):
        grid = np.array([step_load[i] for step_load in loads]).T  # [experts, steps]
        ax = axes[i][0]
        im = ax.imshow(
            grid,
            aspect="auto",
            origin="lower",
            cmap="viridis",
            extent=(steps[0], steps[-1], -0.5, grid.shape[0] - 0.5),
        )
        ax.set_ylabel(f"MoE layer {i}\nexpert")
        fig.colorbar(im, ax=ax, label="share")
    axes[-1][0].set_xlabel("step")
    fig.suptitle("Expert load (share of routed assignments)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
