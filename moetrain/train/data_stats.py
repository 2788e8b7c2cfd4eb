"""Data-loading fields of the logged rows: how long steps waited for their batches, and how far
each data source has got.

- ``data_wait_s``: seconds per step the loop waited for its batch (the prefetching loader's
  queue; with ``data.prefetch=0`` the assembly itself), averaged over the steps since the
  previous row, on the logging rank.
- ``data_epoch/<name>``: epochs of a source completed so far, fractional (its sampler position
  after the last consumed batch); ``<name>`` is ``data.source`` for a single source, each
  mixture entry's name otherwise.
- ``data_share/<name>`` (mixtures only): the share of the training samples (= tokens) the
  source has given since the start of the run, to compare with its weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moetrain.train.callbacks import Callback

if TYPE_CHECKING:
    from moetrain.train.trainer import Trainer


class DataStatistics(Callback):
    """``data_wait_s``, ``data_epoch/*`` and ``data_share/*`` for the logged rows."""

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.steps = 0

    def post_step(self, trainer: Trainer, step: int, row: dict[str, Any] | None) -> None:
        self.wait_s += trainer.train_batches.last_wait_s
        self.steps += 1

    def log_fields(self, trainer: Trainer) -> dict[str, Any]:
        fields: dict[str, Any] = {"data_wait_s": self.wait_s / max(self.steps, 1)}
        self.wait_s, self.steps = 0.0, 0
        progress = trainer.data_sampler.progress(trainer.train_batches.state_dict())
        fields.update({f"data_epoch/{k}": v for k, v in progress["epochs"].items()})
        if len(progress["shares"]) > 1:
            fields.update({f"data_share/{k}": v for k, v in progress["shares"].items()})
        return fields
