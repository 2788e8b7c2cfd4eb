"""``logging.tensorboard=true``: every logged row (the rows of ``metrics.jsonl``) as TensorBoard
scalars under ``<run dir>/tensorboard/``, through ``torch.utils.tensorboard.SummaryWriter``.

Needs the ``tensorboard`` package (``pip install tensorboard`` or the ``moetrain[tensorboard]``
extra); config validation stops a run that asks for it without it. Each numeric field is a scalar
tagged with its key; list fields are split as for wandb: ``expert_load/layer<i>/expert<e>``,
``dead_experts/<i>``, ``dropped_frac_by_position/<i>``. A resumed run discards, as
``metrics.jsonl`` does, what an earlier process logged after the resumed step (the writer's
``purge_step``); a fresh start discards all earlier events in the directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MISSING = (
    "logging.tensorboard=true needs the tensorboard package: pip install tensorboard "
    "(or set logging.tensorboard=false)"
)


def scalar_fields(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric values by TensorBoard tag (``step`` is the x axis, not a scalar)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif key == "expert_load":
            for i, shares in enumerate(value):
                for e, share in enumerate(shares):
                    out[f"expert_load/layer{i}/expert{e}"] = float(share)
        elif isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            for i, v in enumerate(value):
                out[f"{key}/{i}"] = float(v)
    return out


class TensorBoardWriter:
    """Writes rows to ``log_dir``; ``resumed_step``: the step a resumed run continues from
    (None: a fresh start)."""

    def __init__(self, log_dir: Path, resumed_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(MISSING) from err
        purge = 0 if resumed_step is None else resumed_step + 1
        self.writer = SummaryWriter(str(log_dir), purge_step=purge, flush_secs=30)

    def write(self, row: dict[str, Any]) -> None:
        for tag, value in scalar_fields(row).items():
            self.writer.add_scalar(tag, value, global_step=row["step"])

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(
    enabled: bool, run_dir: Path, resumed_step: int | None
) -> TensorBoardWriter | None:
    """``run_dir/tensorboard``'s writer when ``enabled`` (the logging rank with
    ``logging.tensorboard``), else None."""
    return TensorBoardWriter(run_dir / "tensorboard", resumed_step) if enabled else None
