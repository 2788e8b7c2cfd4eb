"""Token arrays -> training windows: the prepared-token source, the window dataset, and
``build_datasets`` which turns a ``DataConfig`` into train/val datasets.

Splits: ``source=stdlib`` splits by file (see ``corpus.py``); ``source=tokens`` holds out the
*last* ``ceil(val_fraction * num_tokens)`` tokens of ``tokens.bin`` as val (the boundary may
fall inside a document), so put held-out documents last when preparing if that matters.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from moetrain.data import corpus
from moetrain.data.config import DataConfig
from moetrain.data.sampler import ShuffledSampler
from moetrain.data.token_file import DTYPES, TOKENS_FILE, read_meta
from moetrain.data.tokenizer import Tokenizer

_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning a memory-mapped file for its max id


class TokenSource:
    """A prepared-token directory, memory-mapped read-only.

    Raises ``FileNotFoundError``/``ValueError`` naming ``data.path`` when ``meta.json`` or
    ``tokens.bin`` is missing, malformed, or ``tokens.bin`` does not hold ``num_tokens`` tokens.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.meta = read_meta(path)
        self.tokens_path = os.path.join(path, TOKENS_FILE)
        dtype = DTYPES[self.meta["dtype"]]
        num_tokens = int(self.meta["num_tokens"])
        if not os.path.isfile(self.tokens_path):
            raise FileNotFoundError(f"data.path: {self.tokens_path} not found; re-run prepare")
        size = os.path.getsize(self.tokens_path)
        if size != num_tokens * dtype.itemsize:
            raise ValueError(
                f"data.path: {self.tokens_path} has {size} bytes but meta.json says "
                f"{num_tokens} {self.meta['dtype']} tokens ({num_tokens * dtype.itemsize} bytes);"
                " the directory is truncated or mixed up: re-run prepare"
            )
        self.tokens: np.ndarray = (
            np.memmap(self.tokens_path, dtype=dtype, mode="r", shape=(num_tokens,))
            if num_tokens
            else np.empty(0, dtype=dtype)
        )
        self._max_id: Optional[int] = None

    def __len__(self) -> int:
        return len(self.tokens)

    def max_token_id(self) -> int:
        """The largest token id in the file (scanned once in chunks, then remembered)."""
        if self._max_id is None:
            starts = range(0, len(self), _SCAN_CHUNK)
            chunk_maxes = (int(self.tokens[i : i + _SCAN_CHUNK].max()) for i in starts)
            self._max_id = max(chunk_maxes, default=-1)
        return self._max_id

    def validate_vocab(self, vocab_size: int) -> None:
        """``ValueError`` naming ``model.vocab_size`` and the file if an id is ``>= vocab_size``."""
        check_vocab(self.max_token_id(), vocab_size, self.tokens_path)

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) views: val is the last ``ceil(val_fraction * len)`` tokens."""
        num_val = math.ceil(val_fraction * len(self))
        cut = len(self) - num_val
        return self.tokens[:cut], self.tokens[cut:]


def check_vocab(max_id: int, vocab_size: int, where: str) -> None:
    """``ValueError`` naming ``model.vocab_size`` and ``where`` if ``max_id >= vocab_size``."""
    if max_id >= vocab_size:
        raise ValueError(
            f"model.vocab_size: {vocab_size} is too small for {where}, which holds token id "
            f"{max_id}; set model.vocab_size >= {max_id + 1} (the tokenizer's vocab size)"
        )


class WindowDataset:
    """Non-overlapping training windows over a 1-D token array.

    Window ``i`` is ``tokens[i*S : i*S + S + 1]``; inputs are its first S tokens and targets
    the last S (shifted by one), so consecutive windows share one boundary token and there are
    ``(len(tokens) - 1) // S`` windows. Trailing tokens that do not fill a window are unused.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if seq_len <= 0:
            raise ValueError(f"train.seq_len: must be positive, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(len(self.tokens) - 1, 0) // self.seq_len

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """(inputs_S, targets_S) of window ``index``, torch.long."""
        inputs_BS, targets_BS = self.batch([index])
        return inputs_BS[0], targets_BS[0]

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[Tensor, Tensor]:
        """(inputs_BS, targets_BS) torch.long for the windows ``indices`` (B = len(indices))."""
        n, S = len(self), self.seq_len
        rows = []
        for i in indices:
            i = int(i)
            if not 0 <= i < n:
                raise IndexError(f"window {i} out of range for {n} windows")
            rows.append(self.tokens[i * S : i * S + S + 1])
        w_BW = torch.from_numpy(np.stack(rows).astype(np.int64))
        return w_BW[:, :-1], w_BW[:, 1:]

    def sampler(self, seed: int) -> ShuffledSampler:
        """The training order over this dataset's windows (``train.seed``)."""
        return ShuffledSampler(len(self), seed)

    def fixed_batches(self, num_batches: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        """The same ``num_batches`` (inputs_BS, targets_BS) batches on every call (for evaluation).

        The ``num_batches * batch_size`` windows are spread evenly over the dataset (window
        ``k * len // total`` for ``k`` in ``range(total)``), so a few batches sample the whole
        split; when the dataset has fewer windows than that, windows repeat cyclically.
        """
        total = num_batches * batch_size
        if total <= len(self):
            idx = (np.arange(total, dtype=np.int64) * len(self)) // total
        else:
            idx = np.arange(total, dtype=np.int64) % len(self)
        return [self.batch(idx[b : b + batch_size]) for b in range(0, total, batch_size)]


def build_datasets(
    cfg: DataConfig, tokenizer: Tokenizer, seq_len: int, vocab_size: int
) -> tuple[Any, Any, dict[str, Any]]:
    """(train, val, metadata) for ``cfg``, with every check a user can fail made up front.

    Raises ``ValueError``/``FileNotFoundError`` naming ``data.*`` (config, files, tokenizer
    mismatch), ``model.vocab_size`` (a token id too large) or ``train.seq_len`` (a split too
    short for one window of ``seq_len + 1`` tokens).
    """
    cfg.validate()
    if seq_len <= 0:
        raise ValueError(f"train.seq_len: must be positive, got {seq_len}")
    if cfg.source == "mix":  # the mixture module builds on this one
        from moetrain.data.mixture import build_mixture

        return build_mixture(cfg, tokenizer, seq_len, vocab_size)
    if cfg.source == "stdlib":
        train = corpus.load_stdlib_tokens("train", tokenizer, cfg.val_fraction)
        val = corpus.load_stdlib_tokens("val", tokenizer, cfg.val_fraction)
        max_id = max(int(a.max()) if len(a) else -1 for a in (train, val))
        check_vocab(max_id, vocab_size, f"the stdlib corpus (data.tokenizer={tokenizer.name})")
        meta = corpus.corpus_metadata(cfg.val_fraction)
    else:
        assert cfg.path is not None  # validate() guarantees it
        source = TokenSource(cfg.path)
        check_tokenizer_matches(source.meta, source.path, tokenizer, "data.tokenizer")
        source.validate_vocab(vocab_size)
        train, val = source.split(cfg.val_fraction)
        meta = {"source": "tokens", "path": os.path.abspath(cfg.path), **source.meta}
    for split, tokens in zip(corpus.SPLITS, (train, val)):
        _check_enough(split, len(tokens), seq_len)
    train_ds, val_ds = WindowDataset(train, seq_len), WindowDataset(val, seq_len)
    meta.update(
        tokenizer=tokenizer.name,
        train_tokens=len(train),
        val_tokens=len(val),
        train_windows=len(train_ds),
        val_windows=len(val_ds),
    )
    return train_ds, val_ds, meta


def check_tokenizer_matches(meta: dict, path: str, tokenizer: Tokenizer, key: str) -> None:
    """``ValueError`` naming ``key`` unless ``tokenizer`` is the one the prepared directory
    ``path`` (its ``meta``) was written with (vocab size and eos id compared)."""
    if meta["vocab_size"] != tokenizer.vocab_size or meta["eos_id"] != tokenizer.eos_id:
        raise ValueError(
            f"{key}: the tokenizer {tokenizer.name!r} (vocab {tokenizer.vocab_size}, eos "
            f"{tokenizer.eos_id}) is not the tokenizer {path!r} was prepared with "
            f"({meta['tokenizer']!r}: vocab {meta['vocab_size']}, eos {meta['eos_id']}); "
            "set data.tokenizer to that one"
        )


def _check_enough(split: str, num_tokens: int, seq_len: int) -> None:
    if num_tokens < seq_len + 1:
        raise ValueError(
            f"train.seq_len: {seq_len} needs at least {seq_len + 1} tokens in each split, but "
            f"the {split} split has {num_tokens}; lower train.seq_len, add data, or raise "
            "data.val_fraction if val is the short one"
        )
