"""``train.nonfinite``: what a step with a non-finite loss or gradient norm does.

``stop`` (default) raises :class:`NonFiniteError` on every rank at that step, before the
optimizer step and any checkpoint; ``skip`` skips the update and counts it, and stops after
``train.max_skipped_steps`` consecutive skips. Every rank decides alike: the loss and the
per-rank flags come from the step's statistics all-reduce, the norm from its global all-reduce.
"""

from __future__ import annotations

import math
from typing import Any


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss, gradient norm or weights; the message is the one line a
    user sees. Every rank raises it at the same step."""


class NonFiniteGuard:
    """Decides, per step, whether the update is applied (``policy``: stop | skip)."""

    def __init__(self, policy: str, max_skipped_steps: int, logging_rank: bool) -> None:
        self.policy, self.max_skipped = policy, max_skipped_steps
        self.logging_rank = logging_rank
        self.skipped_steps = self.consecutive = 0

    def update_allowed(
        self,
        step: int,
        stats: dict[str, Any],
        grad_norm: float,
        first_ranks: list[int | None],
    ) -> bool:
        """True: apply step ``step``'s update; False: skip it. Raises ``NonFiniteError`` when
        the run must stop. ``first_ranks``: the lowest rank whose local loss / gradient shards
        were non-finite (None: none, or a rank outside the reduction such as a TP peer). With
        ``skip``, ``stats`` gains ``skipped_steps`` (skips so far in this process)."""
        bad = None
        if not math.isfinite(stats["loss"]):
            bad = ("loss", stats["loss"], first_ranks[0])
        elif not math.isfinite(grad_norm):
            bad = ("grad norm", grad_norm, first_ranks[1])
        if self.policy == "skip":
            stats["skipped_steps"] = self.skipped_steps + (bad is not None)
        if bad is None:
            self.consecutive = 0
            return True
        what, value, rank = bad
        where = f"first seen on rank {rank}" if rank is not None else "on a tensor-parallel peer"
        line = f"step {step}: non-finite {what} ({value}) {where}"
        if self.policy == "skip" and self.consecutive < self.max_skipped:
            self.skipped_steps += 1
            self.consecutive += 1
            if self.logging_rank:
                print(f"moetrain: {line}; update skipped (train.nonfinite=skip)", flush=True)
            return False
        if self.policy == "skip":
            line += f" after {self.consecutive} consecutive skipped steps"
        raise NonFiniteError(
            f"{line}; stopped with no update or checkpoint after step {step - 1} "
            f"(train.nonfinite={self.policy}); lower optim.lr, keep train.grad_clip on, or set "
            "train.nonfinite=skip"
        )
