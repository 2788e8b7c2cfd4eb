"""The sources of a data mixture (``data.source=mix``): each entry of ``data.sources`` opened as
a flat, read-only token stream with its train and validation parts.

Two formats, detected from the files (``format: auto``) or named:

- ``tokens``: a directory written by ``python -m moetrain.data.prepare`` (``meta.json`` +
  ``tokens.bin``); its tokenizer must be ``data.tokenizer``.
- ``megatron``: a Megatron-LM indexed dataset ``PREFIX.idx`` + ``PREFIX.bin``. Its sequences
  lie back to back in ``.bin`` (Megatron's builder writes them so), so the stream is the
  ``.bin`` file itself memory-mapped, sequence after sequence in index order: token ``k`` of
  the stream is token ``k - start(i)`` of the sequence ``i`` that covers it. The index holds no
  tokenizer, so ids are checked against ``model.vocab_size`` only.

Validation: the source's ``val_path`` (same formats) when given, else the last
``ceil(data.val_fraction * tokens)`` tokens of the stream.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from moetrain.data.config import SourceConfig
from moetrain.data.megatron_indexed import MegatronIndexedDataset
from moetrain.data.token_file import META_FILE

_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning a memory-mapped stream for its max id


@dataclass
class TokenStream:
    """One opened file set: its tokens (a read-only 1-D integer array, usually a memmap), the
    format it was read as, where it lives, and the eos id its ``meta.json`` records (None for
    Megatron datasets, whose index names no tokenizer)."""

    tokens: np.ndarray
    format: str
    where: str
    meta: dict

    def max_token_id(self) -> int:
        """The largest id in the stream (scanned in chunks: a memmap is never loaded whole)."""
        starts = range(0, len(self.tokens), _SCAN_CHUNK)
        return max((int(self.tokens[i : i + _SCAN_CHUNK].max()) for i in starts), default=-1)


@dataclass
class MixtureSource:
    """An entry of ``data.sources`` opened: ``name``, normalized ``weight`` (the share of the
    training samples it should get), and its ``train``/``val`` token arrays."""

    name: str
    path: str
    format: str
    weight: float
    train: np.ndarray
    val: np.ndarray
    max_token_id: int
    meta: dict


def detect_format(path: str, fmt: str, key: str) -> str:
    """``tokens`` or ``megatron`` for ``path`` (``fmt`` ``auto`` looks at the files).

    Raises ``FileNotFoundError`` naming ``key`` when ``path`` is neither a prepared directory
    nor a Megatron-LM prefix (or not the format ``fmt`` insists on)."""
    is_tokens = os.path.isfile(os.path.join(path, META_FILE))
    is_megatron = os.path.isfile(path + ".idx") or os.path.isfile(path + ".bin")
    if fmt == "tokens" or (fmt == "auto" and is_tokens):
        if not is_tokens:
            raise FileNotFoundError(
                f"{key}: {path!r} is not a prepared directory (no {META_FILE}); create it with "
                "`python -m moetrain.data.prepare INPUT ... --output DIR`"
            )
        return "tokens"
    if fmt == "megatron" or is_megatron:
        return "megatron"
    hint = ""
    if path.endswith((".idx", ".bin")):
        hint = f" (a Megatron-LM dataset is named by its prefix: {path[:-4]!r})"
    raise FileNotFoundError(
        f"{key}: {path!r} is neither a prepared directory (DIR/{META_FILE}) nor a Megatron-LM "
        f"indexed dataset (PREFIX.idx + PREFIX.bin){hint}; check the path"
    )


def open_stream(path: str, fmt: str, key: str) -> TokenStream:
    """Open ``path`` as format ``fmt`` (``auto``, ``tokens`` or ``megatron``); errors name
    ``key`` and the file."""
    fmt = detect_format(path, fmt, key)
    try:
        if fmt == "tokens":
            from moetrain.data.dataset import TokenSource  # dataset imports this module

            source = TokenSource(path)
            return TokenStream(source.tokens, fmt, source.tokens_path, dict(source.meta))
        return _megatron_stream(path)
    except (ValueError, FileNotFoundError) as err:
        message = str(err).replace("data.path: ", "")
        raise type(err)(f"{key}: {message}") from err


def _megatron_stream(prefix: str) -> TokenStream:
    ds = MegatronIndexedDataset(prefix)
    if ds.dtype.kind not in "iu":
        raise ValueError(
            f"{ds.bin_path}: tokens stored as {ds.dtype}, not integers; write token ids"
        )
    lengths = ds.sequence_lengths.astype(np.int64)
    pointers = ds.sequence_pointers
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) * ds.dtype.itemsize
    if len(pointers) and not np.array_equal(pointers, starts):
        raise ValueError(
            f"{ds.idx_path}: its sequences are not stored back to back in {ds.bin_path} (as "
            "Megatron-LM's builder writes them); re-create the dataset with "
            "tools/preprocess_data.py"
        )
    num_tokens = ds.num_tokens
    tokens = (
        np.memmap(ds.bin_path, dtype=ds.dtype, mode="r", shape=(num_tokens,))
        if num_tokens
        else np.empty(0, dtype=ds.dtype)
    )
    meta = {"num_sequences": ds.num_sequences, "num_documents": ds.num_documents}
    return TokenStream(tokens, "megatron", ds.bin_path, meta)


def open_source(
    cfg: SourceConfig, index: int, total_weight: float, val_fraction: float
) -> MixtureSource:
    """The ``index``-th entry of ``data.sources`` opened, its weight divided by
    ``total_weight``. Raises ``FileNotFoundError``/``ValueError`` naming ``data.sources[index]``."""
    key = f"data.sources[{index}]"
    stream = open_stream(cfg.path, cfg.format, f"{key}.path")
    if cfg.val_path:
        val_stream = open_stream(cfg.val_path, cfg.format, f"{key}.val_path")
        train, val = stream.tokens, val_stream.tokens
        max_id = max(stream.max_token_id(), val_stream.max_token_id())
    else:
        num_val = math.ceil(val_fraction * len(stream.tokens))
        cut = len(stream.tokens) - num_val
        train, val = stream.tokens[:cut], stream.tokens[cut:]
        max_id = stream.max_token_id()
    return MixtureSource(
        name=cfg.name or default_name(cfg.path),
        path=os.path.abspath(cfg.path),
        format=stream.format,
        weight=cfg.weight / total_weight,
        train=train,
        val=val,
        max_token_id=max_id,
        meta={**stream.meta, "where": stream.where},
    )


def default_name(path: str) -> str:
    """The last component of ``path`` (a prefix's file-name part; a directory's name)."""
    return os.path.basename(os.path.normpath(path)) or path


def unique_names(names: list[str]) -> list[str]:
    """``names`` with repeats suffixed ``#2``, ``#3``... (two sources named ``web`` log apart)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out
