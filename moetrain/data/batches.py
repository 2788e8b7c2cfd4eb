"""BatchIterator: sampler indices -> (inputs_BS, targets_BS) micro-batches, per data-parallel rank.

Layout of one optimizer step (global batch of G sequences, micro-batch size m, dp ranks P):
every rank draws the *same* G window indices from its sampler (same seed, same state), and
micro-batch ``j`` of rank ``r`` is positions ``[(j*P + r)*m, (j*P + r + 1)*m)`` of that chunk,
for ``j`` in ``range(G // (m*P))``. With P=1 this is simply the chunk cut into consecutive
micro-batches, so the single-process run processes micro-batch ``j*P + r`` of its step exactly
when rank ``r`` processes its ``j``-th: the union over ranks of each step's micro-batches is
the single-process step's set of micro-batches, micro-batch for micro-batch. The sampler state
is therefore the same on every rank and counts sequences, so it resumes at any layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moetrain.data.dataset import WindowDataset
from moetrain.data.sampler import ShuffledSampler

Batch = tuple[torch.Tensor, torch.Tensor]


def micro_batch_slices(
    global_batch_size: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1
) -> list[slice]:
    """Positions in a global batch of the micro-batches of ``dp_rank``, in processing order.

    Raises ``ValueError`` naming ``train.global_batch_size`` unless it is a multiple of
    ``micro_batch_size * dp_size``.
    """
    per_step = micro_batch_size * dp_size
    if global_batch_size <= 0 or global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size: {global_batch_size} must be a positive multiple of "
            f"train.micro_batch_size ({micro_batch_size}) x data-parallel degree ({dp_size}) "
            f"= {per_step}"
        )
    num_micro = global_batch_size // per_step
    starts = [(j * dp_size + dp_rank) * micro_batch_size for j in range(num_micro)]
    return [slice(s, s + micro_batch_size) for s in starts]


class BatchIterator:
    """Micro-batches of ``dataset`` windows in ``sampler`` order, for one data-parallel rank.

    Args:
        dataset: the windows.
        sampler: the index stream (same seed and state on every rank).
        batch_size: the micro-batch size m (``train.micro_batch_size``).
        dp_rank, dp_size: this rank and the data-parallel degree (default: single process).

    ``next(it)`` returns one (inputs_BS, targets_BS) torch.long micro-batch (B = m) drawn from a
    chunk of ``m * dp_size`` indices; ``next_global_batch(G)`` returns this rank's micro-batches
    of one optimizer step (see the module docstring for the layout).
    """

    def __init__(
        self,
        dataset: WindowDataset,
        sampler: ShuffledSampler,
        batch_size: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"train.micro_batch_size: must be positive, got {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if sampler.num_items != len(dataset):
            raise ValueError(
                f"sampler covers {sampler.num_items} items but the dataset has {len(dataset)}"
            )
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        return self.next_global_batch(self.batch_size * self.dp_size)[0]

    def next_global_indices(self, global_batch_size: int) -> list[np.ndarray]:
        """This rank's window indices of the next step, one array per micro-batch."""
        slices = micro_batch_slices(global_batch_size, self.batch_size, self.dp_rank, self.dp_size)
        chunk = self.sampler.take(global_batch_size)
        return [chunk[s] for s in slices]

    def next_global_batch(self, global_batch_size: int) -> list[Batch]:
        """This rank's (inputs_BS, targets_BS) micro-batches of the next optimizer step."""
        return [self.dataset.batch(idx) for idx in self.next_global_indices(global_batch_size)]

    def state_dict(self) -> dict[str, Any]:
        """The sampler position (identical on every rank); JSON-serializable."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``'s output."""
        self.sampler.load_state_dict(state)
