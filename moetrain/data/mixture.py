"""Weighted mixtures of token sources (``data.source=mix``): the windows of every source under
one index, and a deterministic, resumable sampler whose realized shares follow the weights.

Index space: the mixture's item ``offset[i] + w`` is window ``w`` of source ``i`` (sources in
``data.sources`` order), so ``BatchIterator`` and the data-parallel layout work unchanged.

Blending (Megatron-LM's ``BlendedDataset`` rule): sample ``n`` of the stream (counting from the
run's start) goes to the source with the largest deficit ``weight_i * (n + 1) - count_i``
(``count_i``: samples it got so far; ties to the lower index). Every source then stays within
one sample of its exact share at every point of the stream, so the realized share of source
``i`` after N samples differs from ``weight_i`` by less than ``1 / N``. Windows all hold
``seq_len`` tokens, so sample shares are token shares. Within a source, windows come from its
own ``ShuffledSampler`` (stream ``i`` of ``train.seed``): every window once per epoch of that
source, epochs counted per source.

State: the number of samples drawn, each source's count and sampler position, and the
mixture's fingerprint (each source's path, weight and window count). Loading a state whose
fingerprint differs is refused unless ``allow_change`` (``data.allow_mixture_change``): then
sources are matched by path, a matched source continues from its position, a new one starts at
its beginning, and blending restarts from zero counts with the new weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moetrain.data.config import DataConfig
from moetrain.data.dataset import WindowDataset, check_tokenizer_matches, check_vocab
from moetrain.data.sampler import ShuffledSampler
from moetrain.data.sources import open_source, unique_names
from moetrain.data.tokenizer import Tokenizer

Batch = tuple[Tensor, Tensor]
CHANGE_HINT = (
    "resume with the mixture the checkpoint was written with, or set "
    "data.allow_mixture_change=true to continue with this one (sources are matched by path)"
)


def blend(weights: np.ndarray, counts: np.ndarray, drawn: int, n: int) -> np.ndarray:
    """The sources of the next ``n`` samples, given ``drawn`` samples so far of which source
    ``i`` got ``counts[i]`` (updated in place). ``weights`` sum to 1."""
    out = np.empty(n, dtype=np.int64)
    for k in range(n):
        i = int(np.argmax(weights * (drawn + k + 1) - counts))
        out[k] = i
        counts[i] += 1
    return out


class MixtureWindows:
    """The training (or validation) windows of every source of a mixture under one index.

    Args:
        datasets: one ``WindowDataset`` per source, in ``data.sources`` order.
        names: the sources' names (logs).
        weights: the sources' shares (normalized; used by ``fixed_batches`` and ``sampler``).
        identities: per source, what identifies it in a checkpoint (its absolute path).
    """

    def __init__(
        self,
        datasets: Sequence[WindowDataset],
        names: Sequence[str],
        weights: Sequence[float],
        identities: Sequence[str],
    ) -> None:
        self.datasets = list(datasets)
        self.names = list(names)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.identities = list(identities)
        self.allow_change = False  # data.allow_mixture_change, for the samplers it makes
        self.seq_len = self.datasets[0].seq_len
        sizes = np.array([len(d) for d in self.datasets], dtype=np.int64)
        self.offsets = np.concatenate(([0], np.cumsum(sizes)))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, window within the source) of mixture items ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and not (indices.min() >= 0 and indices.max() < len(self)):
            raise IndexError(f"mixture items {indices} out of range for {len(self)} windows")
        source = np.searchsorted(self.offsets, indices, side="right") - 1
        return source, indices - self.offsets[source]

    def batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """(inputs_BS, targets_BS) torch.long for mixture items ``indices``."""
        source, local = self.locate(np.asarray(indices, dtype=np.int64))
        inputs_BS = torch.empty(len(source), self.seq_len, dtype=torch.long)
        targets_BS = torch.empty_like(inputs_BS)
        for i in np.unique(source):
            where = torch.from_numpy(np.flatnonzero(source == i))
            inputs_BS[where], targets_BS[where] = self.datasets[int(i)].batch(local[source == i])
        return inputs_BS, targets_BS

    def sampler(self, seed: int) -> MixtureSampler:
        """The training order: the weighted blend of the sources' shuffled windows."""
        return MixtureSampler(self, seed, self.allow_change)

    def fixed_batches(self, num_batches: int, batch_size: int) -> list[Batch]:
        """The same ``num_batches`` batches on every call (evaluation): the
        ``num_batches * batch_size`` windows are given to the sources by the blending rule and
        spread evenly over each source's windows (``WindowDataset.fixed_batches``' rule)."""
        total = num_batches * batch_size
        counts = np.zeros(len(self.datasets), dtype=np.float64)
        choice = blend(self.weights, counts, 0, total)
        items = np.empty(total, dtype=np.int64)
        for i, dataset in enumerate(self.datasets):
            where = np.flatnonzero(choice == i)
            if not len(where):
                continue
            if len(where) <= len(dataset):
                local = (np.arange(len(where)) * len(dataset)) // len(where)
            else:
                local = np.arange(len(where)) % len(dataset)
            items[where] = self.offsets[i] + local
        return [self.batch(items[b : b + batch_size]) for b in range(0, total, batch_size)]


class MixtureSampler:
    """Mixture item indices forever, in the blended order (see the module docstring).

    ``take(n)``, ``num_items``, ``state_dict()``, ``load_state_dict()`` and ``progress()`` as
    ``ShuffledSampler``.
    """

    def __init__(self, windows: MixtureWindows, seed: int, allow_change: bool = False) -> None:
        self.windows = windows
        self.num_items = len(windows)
        self.allow_change = allow_change
        self.samplers = [
            ShuffledSampler(len(d), seed, stream=i) if len(d) else None
            for i, d in enumerate(windows.datasets)
        ]
        self.drawn = 0
        self.counts = np.zeros(len(windows.datasets), dtype=np.float64)

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` mixture items, advancing the state."""
        choice = blend(self.windows.weights, self.counts, self.drawn, n)
        self.drawn += n
        out = np.empty(n, dtype=np.int64)
        for i, sampler in enumerate(self.samplers):
            where = np.flatnonzero(choice == i)
            if len(where):
                assert sampler is not None  # a source with no windows has weight 0
                out[where] = self.windows.offsets[i] + sampler.take(len(where))
        return out

    def progress(self, state: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
        """Per source, at ``state`` (default: now): ``epochs`` completed, fractional (``epoch +
        index / windows``), and ``shares`` of the samples (= tokens) drawn so far."""
        state = state or self.state_dict()
        names, sizes = self.windows.names, [len(d) for d in self.windows.datasets]
        epochs = {
            name: (p["epoch"] + p["index"] / size) if p is not None else 0.0
            for name, p, size in zip(names, state["positions"], sizes)
        }
        total = max(int(state["drawn"]), 1)
        shares = {name: c / total for name, c in zip(names, state["counts"])}
        return {"epochs": epochs, "shares": shares}

    def fingerprint(self) -> list[dict[str, Any]]:
        w = self.windows
        return [
            {"path": p, "weight": float(x), "windows": len(d)}
            for p, x, d in zip(w.identities, w.weights, w.datasets)
        ]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable: samples drawn, per-source counts and positions, fingerprint."""
        return {
            "mixture": self.fingerprint(),
            "drawn": self.drawn,
            "counts": [int(c) for c in self.counts],
            "positions": [s.state_dict() if s is not None else None for s in self.samplers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``'s output. ``ValueError`` naming ``data.sources`` when
        the state was written by another mixture (or without one) and changes are not allowed."""
        if not isinstance(state, dict) or "mixture" not in state:
            raise ValueError(
                "data.source: the checkpoint's data position was written without data.source=mix;"
                f" {CHANGE_HINT}"
            )
        if state["mixture"] == self.fingerprint():
            self.drawn = int(state["drawn"])
            self.counts = np.asarray(state["counts"], dtype=np.float64)
            for sampler, position in zip(self.samplers, state["positions"]):
                if sampler is not None:
                    sampler.load_state_dict(position)
            return
        if not self.allow_change:
            raise ValueError(
                f"data.sources: the checkpoint was written with the mixture {state['mixture']}, "
                f"this run has {self.fingerprint()}; {CHANGE_HINT}"
            )
        self._load_changed(state)

    def _load_changed(self, state: dict[str, Any]) -> None:
        """``data.allow_mixture_change``: matched sources continue, blending restarts."""
        old = {
            entry["path"]: position
            for entry, position in zip(state["mixture"], state["positions"])
            if position is not None
        }
        for path, sampler in zip(self.windows.identities, self.samplers):
            if sampler is not None and path in old:
                position = old[path]
                if position["index"] > sampler.num_items:  # the file changed: start it over
                    position = {"epoch": position["epoch"], "index": 0}
                sampler.load_state_dict(position)
        self.drawn = 0
        self.counts = np.zeros(len(self.samplers), dtype=np.float64)


def build_mixture(
    cfg: DataConfig, tokenizer: Tokenizer, seq_len: int, vocab_size: int
) -> tuple[MixtureWindows, MixtureWindows, dict[str, Any]]:
    """(train, val, metadata) of ``data.sources``: every check a user can fail made up front
    (files, format, tokenizer of prepared directories, token ids per source against
    ``model.vocab_size``, enough tokens for one window per split), each naming the entry."""
    total = sum(src.weight for src in cfg.sources)
    sources = [open_source(src, i, total, cfg.val_fraction) for i, src in enumerate(cfg.sources)]
    names = unique_names([s.name for s in sources])
    for i, (name, source) in enumerate(zip(names, sources)):
        source.name = name
        if source.format == "tokens":
            check_tokenizer_matches(source.meta, source.path, tokenizer, f"data.sources[{i}]")
        check_vocab(source.max_token_id, vocab_size, f"data.sources[{i}] ({source.meta['where']})")
        for split, tokens in (("train", source.train), ("val", source.val)):
            if source.weight > 0 and len(tokens) < seq_len + 1:
                raise ValueError(
                    f"data.sources[{i}]: its {split} split has {len(tokens)} tokens, fewer than "
                    f"one window of train.seq_len + 1 = {seq_len + 1}; add data, lower "
                    "train.seq_len or give it weight 0"
                )
    weights = [s.weight for s in sources]
    paths = [s.path for s in sources]
    train = MixtureWindows(
        [WindowDataset(s.train, seq_len) for s in sources], names, weights, paths
    )
    val = MixtureWindows([WindowDataset(s.val, seq_len) for s in sources], names, weights, paths)
    train.allow_change = cfg.allow_mixture_change
    meta = {
        "source": "mix",
        "tokenizer": tokenizer.name,
        "train_tokens": sum(len(s.train) for s in sources),
        "val_tokens": sum(len(s.val) for s in sources),
        "train_windows": len(train),
        "val_windows": len(val),
        "sources": [
            {
                "name": s.name,
                "path": s.path,
                "format": s.format,
                "weight": s.weight,
                "train_tokens": len(s.train),
                "val_tokens": len(s.val),
                "train_windows": len(d),
            }
            for s, d in zip(sources, train.datasets)
        ],
    }
    return train, val, meta
