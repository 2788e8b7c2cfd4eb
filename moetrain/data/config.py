"""DataConfig: where training tokens come from (it becomes ``data`` in the Hydra config).

Field types are the ones OmegaConf accepts (str validated against a set of choices, Optional).
Construction checks the values; ``validate()`` also checks the files they name, so a missing
directory or tokenizer fails at start with a message naming the setting and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NoReturn, Optional

SOURCES = ("stdlib", "tokens")
BYTE_TOKENIZER = "byte"
PREPARE_HINT = "python -m moetrain.data.prepare INPUT ... --output DIR"


@dataclass
class DataConfig:
    """Where the training tokens come from.

    ``source="stdlib"`` tokenizes the Python standard library's sources at start (the built-in
    corpus, no download); ``source="tokens"`` reads a directory written by
    ``python -m moetrain.data.prepare`` (``path``). ``tokenizer`` is ``"byte"`` or the path of
    a Hugging Face ``tokenizer.json``; for ``source="tokens"`` it must be the one the directory
    was prepared with. ``val_fraction`` is the share held out for validation (by file hash for
    stdlib, the last tokens for a prepared directory; see docs/data.md).
    """

    source: str = "stdlib"
    path: Optional[str] = None
    tokenizer: str = BYTE_TOKENIZER
    val_fraction: float = 0.05

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
        if self.source == "tokens" and not self.path:
            _fail(
                "path",
                "is required for data.source=tokens: set it to a directory written by "
                f"`{PREPARE_HINT}`",
            )
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


def _fail(name: str, why: str) -> NoReturn:
    raise ValueError(f"data.{name}: {why}")
