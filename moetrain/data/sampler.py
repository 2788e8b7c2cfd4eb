"""ShuffledSampler: an endless, resumable stream of item indices, reshuffled every epoch.

Epoch ``e`` visits every index in ``range(num_items)`` exactly once, in the order
``numpy.random.Generator(PCG64(SeedSequence([seed, e]))).permutation(num_items)``; epochs
follow one another forever. The position is two integers (``epoch``, ``index`` = how many
items of that epoch were already drawn), so ``load_state_dict(state_dict())`` resumes the
exact same sequence, in any process, on any machine.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


class ShuffledSampler:
    """Deterministic per-epoch permutations of ``range(num_items)``, iterated forever.

    Args:
        num_items: the number of items (dataset windows); must be positive.
        seed: a non-negative integer; the same seed gives the same stream everywhere.
        stream: a non-negative integer naming an independent stream of the same seed (the
            sources of a mixture): epoch ``e`` is then drawn from ``SeedSequence([seed, stream,
            e])``. None (the default) is the single-source stream described above.
    """

    def __init__(self, num_items: int, seed: int, stream: Optional[int] = None) -> None:
        if num_items <= 0:
            raise ValueError(f"ShuffledSampler needs at least one item, got num_items={num_items}")
        if seed < 0:
            raise ValueError(f"train.seed: must be >= 0 for the data sampler, got {seed}")
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.stream = stream
        self.name = "data"  # how progress() names it (the trainer sets data.source)
        self.epoch = 0
        self.index = 0
        self._perm: Optional[np.ndarray] = None
        self._perm_epoch = -1

    def permutation(self, epoch: int) -> np.ndarray:
        """The visiting order of ``epoch`` (int64 indices)."""
        words = [self.seed, epoch] if self.stream is None else [self.seed, self.stream, epoch]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))
        return rng.permutation(self.num_items)

    def _current(self) -> np.ndarray:
        if self._perm is None or self._perm_epoch != self.epoch:
            self._perm, self._perm_epoch = self.permutation(self.epoch), self.epoch
        return self._perm

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` indices (crossing into later epochs as needed), advancing the state."""
        out = []
        while n > 0:
            step = min(n, self.num_items - self.index)
            out.append(self._current()[self.index : self.index + step])
            self.index += step
            n -= step
            if self.index == self.num_items:  # keep index < num_items: the next epoch starts
                self.epoch, self.index = self.epoch + 1, 0
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def __iter__(self) -> ShuffledSampler:
        return self

    def __next__(self) -> int:
        return int(self.take(1)[0])

    def progress(self, state: dict[str, int] | None = None) -> dict[str, dict[str, float]]:
        """At ``state`` (default: now): ``{"epochs": {name: epoch + index / num_items},
        "shares": {name: 1.0}}`` with ``name`` this sampler's ``name`` (a mixture reports one
        entry per source)."""
        state = state or self.state_dict()
        return {
            "epochs": {self.name: state["epoch"] + state["index"] / self.num_items},
            "shares": {self.name: 1.0},
        }

    def state_dict(self) -> dict[str, int]:
        """The position: ``{"epoch": e, "index": i}`` (i items of epoch e already drawn)."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from ``state_dict()``'s output; ``ValueError`` if it does not fit this sampler."""
        try:
            epoch, index = int(state["epoch"]), int(state["index"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"sampler state must be {{'epoch': int, 'index': int}}, got {state!r}; a "
                "checkpoint written with data.source=mix resumes with that mixture only"
            ) from err
        if epoch < 0 or not 0 <= index <= self.num_items:
            raise ValueError(
                f"sampler state {state!r} does not fit {self.num_items} items; was the "
                "checkpoint written with different data or train.seq_len?"
            )
        self.epoch, self.index = epoch, index
        if self.index == self.num_items:
            self.epoch, self.index = self.epoch + 1, 0
