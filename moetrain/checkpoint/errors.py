"""The error every checkpoint reader and writer raises for a problem a user can fix (a missing,
truncated or mismatched file, a model config that does not match): importable by the native and
the Hugging Face code alike, so neither depends on the other. :func:`cli_status` turns it into
the command-line tools' one-line message and exit status."""

from __future__ import annotations

import sys
from collections.abc import Callable


class CheckpointError(ValueError):
    """A checkpoint cannot be read, written or used as asked; the message names the file or the
    setting at fault."""


def cli_status(prog: str, body: Callable[[], int], *errors: type[Exception]) -> int:
    """A command-line tool's exit status: ``body()``'s, or 2 after printing one line
    ``<prog>: error: <message>`` to stderr for an error a user can cause (a
    :class:`CheckpointError` or one of ``errors``); other exceptions propagate."""
    caught: tuple[type[Exception], ...] = (CheckpointError, *errors)
    try:
        return body()
    except caught as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
