"""DataConfig: where training tokens come from (it becomes ``data`` in the Hydra config).

Field types are the ones OmegaConf accepts (str validated against a set of choices, Optional,
a list of ``SourceConfig``). Construction checks the values; ``validate()`` also checks the
files they name, so a missing directory or tokenizer fails at start with a message naming the
setting and the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import List, NoReturn, Optional

SOURCES = ("stdlib", "tokens", "mix")
SOURCE_FORMATS = ("auto", "tokens", "megatron")
DOCUMENT_POSITIONS = ("restart", "continue")
BYTE_TOKENIZER = "byte"
PREPARE_HINT = "python -m moetrain.data.prepare INPUT ... --output DIR"


@dataclass
class SourceConfig:
    """One entry of ``data.sources`` (``data.source=mix``).

    ``path``: a prepared directory (``python -m moetrain.data.prepare``) or a Megatron-LM
    indexed dataset prefix (``PREFIX.bin`` + ``PREFIX.idx``); ``format`` ``auto`` detects which
    from the files, ``tokens``/``megatron`` insist. ``weight``: its share of the training
    tokens (weights are normalized by their sum). ``name``: how logs call it (default: the
    last part of ``path``). ``val_path``: a separate validation set for this source (same
    formats); without it the last ``data.val_fraction`` of the source's tokens are held out.
    """

    path: str = "???"
    weight: float = 1.0
    name: Optional[str] = None
    format: str = "auto"
    val_path: Optional[str] = None


@dataclass
class DataConfig:
    """Where the training tokens come from.

    ``source="stdlib"`` tokenizes the Python standard library's sources at start (the built-in
    corpus, no download); ``source="tokens"`` reads a directory written by
    ``python -m moetrain.data.prepare`` (``path``); ``source="mix"`` samples the weighted
    ``sources`` (prepared directories and Megatron-LM indexed datasets). ``tokenizer`` is
    ``"byte"`` or the path of a Hugging Face ``tokenizer.json``; for prepared directories it
    must be the one they were prepared with. ``val_fraction`` is the share held out for
    validation (by file hash for stdlib, the last tokens otherwise; see docs/data.md).

    ``document_mask``: attention never crosses an end-of-document token inside a packed window
    (Megatron-LM's ``reset_attention_mask``); ``document_positions`` ``restart`` (default)
    numbers RoPE positions from 0 in each document, ``continue`` keeps window positions.
    ``prefetch``: batches assembled ahead of the step by a background thread (0: inline).
    ``allow_mixture_change``: resume a checkpoint whose data mixture differs from this one.
    """

    source: str = "stdlib"
    path: Optional[str] = None
    tokenizer: str = BYTE_TOKENIZER
    val_fraction: float = 0.05
    sources: List[SourceConfig] = field(default_factory=list)
    document_mask: bool = False
    document_positions: str = "restart"
    prefetch: int = 2
    allow_mixture_change: bool = False

    def __post_init__(self) -> None:
        self.validate(check_files=False)

    def validate(self, check_files: bool = True) -> None:
        """Raise ``ValueError`` (bad value) or ``FileNotFoundError`` (missing file), naming it.

        Args:
            check_files: also check that ``path`` and a tokenizer path exist on this machine.
        """
        if self.source not in SOURCES:
            _fail("source", f"must be one of {', '.join(SOURCES)}; got {self.source!r}")
        if not 0 < self.val_fraction <= 0.5:
            _fail("val_fraction", f"must be in (0, 0.5], got {self.val_fraction}")
        if self.document_positions not in DOCUMENT_POSITIONS:
            _fail(
                "document_positions",
                f"must be one of {', '.join(DOCUMENT_POSITIONS)}; got {self.document_positions!r}",
            )
        if self.prefetch < 0:
            _fail("prefetch", f"must be >= 0 (0: no background loading), got {self.prefetch}")
        if self.source == "tokens" and not self.path:
            _fail(
                "path",
                "is required for data.source=tokens: set it to a directory written by "
                f"`{PREPARE_HINT}`",
            )
        self._validate_sources()
        if not check_files:
            return
        if self.source == "tokens" and self.path and not os.path.isdir(self.path):
            raise FileNotFoundError(
                f"data.path: {self.path!r} does not exist or is not a directory; create it with "
                f"`{PREPARE_HINT}` and point data.path at DIR"
            )
        if self.tokenizer != BYTE_TOKENIZER and not os.path.isfile(self.tokenizer):
            raise FileNotFoundError(
                f"data.tokenizer: {self.tokenizer!r} is neither 'byte' nor an existing file; "
                "give the path of a Hugging Face tokenizer.json or use 'byte'"
            )

    def _validate_sources(self) -> None:
        if self.source != "mix":
            if self.sources:
                _fail(
                    "sources",
                    f"is set but data.source is {self.source!r}; mixtures need data=mix "
                    "(data.source=mix), else drop data.sources",
                )
            return
        if self.path is not None:
            _fail(
                "path",
                "is not read with data.source=mix; give each source's path in data.sources",
            )
        if not self.sources:
            _fail(
                "sources",
                "is empty; data.source=mix needs a list like "
                '"data.sources=[{path: DIR_OR_PREFIX, weight: 1.0}]"',
            )
        for i, src in enumerate(self.sources):
            key = f"sources[{i}]"
            if not src.path or src.path == "???":
                _fail(f"{key}.path", "is required: a prepared directory or a Megatron-LM prefix")
            if src.format not in SOURCE_FORMATS:
                _fail(
                    f"{key}.format",
                    f"must be one of {', '.join(SOURCE_FORMATS)}; got {src.format!r}",
                )
            if not (math.isfinite(src.weight) and src.weight >= 0):
                _fail(f"{key}.weight", f"must be a finite number >= 0, got {src.weight}")
        if not sum(src.weight for src in self.sources) > 0:
            _fail(
                "sources",
                "weights must sum to a positive number, got "
                f"{[src.weight for src in self.sources]}",
            )


def _fail(name: str, why: str) -> NoReturn:
    raise ValueError(f"data.{name}: {why}")
