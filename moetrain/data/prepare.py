"""Tokenize text files into a prepared-token directory (``data.source=tokens``).

    python -m moetrain.data.prepare INPUT [INPUT ...] --output DIR \\
        [--tokenizer byte|PATH] [--text-key text] [--force]

An INPUT is a ``.txt`` file (one document), a ``.jsonl`` file (one document per non-blank
line, its text under ``--text-key``) or a directory (its ``.txt``/``.jsonl`` files, recursively,
in sorted order). Documents keep the order given. The output format is described in
``moetrain/data/token_file.py`` and docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Optional

from moetrain.data.config import BYTE_TOKENIZER
from moetrain.data.token_file import TokenDirWriter
from moetrain.data.tokenizer import build_tokenizer

SUFFIXES = (".txt", ".jsonl")
_BATCH_CHARS = 32 << 20  # tokenize ~32 MB of text at a time: bounded memory, batched HF calls


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """The input files: each INPUT itself, or a directory's ``.txt``/``.jsonl`` files (sorted).

    Raises ``FileNotFoundError`` for a missing INPUT and ``ValueError`` for another suffix.
    """
    files: list[str] = []
    for path in inputs:
        if os.path.isdir(path):
            found = [
                os.path.join(d, name)
                for d, _, names in os.walk(path)
                for name in names
                if name.endswith(SUFFIXES)
            ]
            files.extend(sorted(found))
        elif not os.path.exists(path):
            raise FileNotFoundError(f"INPUT {path!r} does not exist")
        elif path.endswith(SUFFIXES):
            files.append(path)
        else:
            raise ValueError(
                f"INPUT {path!r}: expected a .txt file (one document), a .jsonl file (one "
                "document per line) or a directory of them"
            )
    return files


def iter_documents(path: str, text_key: str) -> Iterator[str]:
    """The documents of one input file; ``ValueError`` naming ``file:line`` on bad content."""
    if path.endswith(".txt"):
        yield _read_text(path)
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield _jsonl_text(line, text_key, f"{path}:{lineno}")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}); convert it to UTF-8") from err


def _jsonl_text(line: str, text_key: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from err
    if not isinstance(record, dict) or text_key not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{where}: no key {text_key!r} (found: {keys}); set --text-key to the key that "
            "holds the document text"
        )
    text = record[text_key]
    if not isinstance(text, str):
        raise ValueError(f"{where}: {text_key!r} holds a {type(text).__name__}, not a string")
    return text


def check_output(output: str, force: bool) -> None:
    """Refuse a non-empty ``--output`` unless ``force``; refuse a file in its place."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output!r} is a file; give a directory")
    if os.path.isdir(output) and os.listdir(output) and not force:
        raise ValueError(
            f"--output {output!r} exists and is not empty; pass --force to overwrite its "
            "tokens.bin/meta.json, or choose a new directory"
        )


def prepare(
    inputs: Sequence[str],
    output: str,
    tokenizer: str = BYTE_TOKENIZER,
    text_key: str = "text",
    force: bool = False,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``output`` (``tokens.bin`` + ``meta.json``); return the meta.

    Raises ``FileNotFoundError``/``ValueError`` for a missing input, bad content (naming
    ``file:line``), an unknown tokenizer, no documents, or a non-empty output without ``force``.
    """
    files = expand_inputs(inputs)
    if not files:
        raise ValueError(f"no .txt or .jsonl files found in {list(inputs)}")
    check_output(output, force)
    tok = build_tokenizer(tokenizer)
    with TokenDirWriter(output, tok) as writer:
        batch: list[str] = []
        chars = 0
        for path in files:
            for text in iter_documents(path, text_key):
                batch.append(text)
                chars += len(text)
                if chars >= _BATCH_CHARS:
                    writer.write(tok.encode_documents(batch), len(batch))
                    batch, chars = [], 0
        if batch:
            writer.write(tok.encode_documents(batch), len(batch))
        if writer.num_documents == 0:
            raise ValueError(f"no documents found in {files}")
        return writer.commit()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; prints a one-line summary, or ``error: ...`` and returns 2."""
    parser = argparse.ArgumentParser(
        prog="python -m moetrain.data.prepare",
        description="Tokenize .txt/.jsonl files into a directory for data.source=tokens.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt, .jsonl or directory")
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--tokenizer", default=BYTE_TOKENIZER, help="'byte' or a tokenizer.json")
    parser.add_argument("--text-key", default="text", help="jsonl key holding the text")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty DIR")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.inputs, args.output, args.tokenizer, args.text_key, args.force)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {meta['num_tokens']:,} tokens ({meta['num_documents']:,} documents, "
        f"{meta['dtype']}, tokenizer {meta['tokenizer']}) to {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
