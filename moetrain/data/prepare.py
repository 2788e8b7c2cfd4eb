"""Tokenize text into a prepared-token directory (``data.source=tokens``) or a Megatron-LM dataset.

    python -m moetrain.data.prepare INPUT [INPUT ...] --output DIR|PREFIX \\
        [--tokenizer byte|PATH] [--text-key text] [--workers N] [--format tokens|megatron] \\
        [--chunk-mb 4] [--force]

An INPUT is a ``.txt`` file (one document), a ``.jsonl`` file (one document per non-blank line,
its text under ``--text-key``), the same gzip- or zstandard-compressed (``.jsonl.gz``,
``.jsonl.zst``), a ``.parquet`` file (its ``--text-key`` column), a Hugging Face ``datasets``
directory written by ``save_to_disk`` (read with pyarrow; ``datasets`` is not needed), or a
directory (its files of those kinds and the ``datasets`` directories in it, recursively, in
sorted order). Documents keep the order given. The readers are in ``moetrain.data.readers``.

Streaming and parallel: the main process reads the inputs in order and cuts them into chunks of
about ``--chunk-mb`` of raw records; ``--workers N`` (N > 1) starts N processes (``forkserver``:
no fork of a threaded parent; each builds its tokenizer once) that decode and tokenize the chunks,
at most ``2 N`` in flight, and the main process writes the results in chunk order. So the output
is the same bytes for every N and memory is bounded whatever the input size (a ``.txt`` file is
one document and is read whole: the one exception). An error anywhere (main process or worker)
stops the pool and leaves the output as it was.

``--format tokens`` writes ``tokens.bin`` + ``meta.json`` in DIR (``moetrain/data/token_file.py``);
``--format megatron`` writes ``PREFIX.bin`` + ``PREFIX.idx``, a Megatron-LM indexed dataset with one
sequence per document (``moetrain/data/megatron_writer.py``). The same tokens either way: each
document followed by the tokenizer's eos. See docs/data.md.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from moetrain.data.config import BYTE_TOKENIZER
from moetrain.data.megatron_writer import MegatronWriter, check_prefix
from moetrain.data.readers import (
    SUFFIX_READERS,
    Piece,
    file_reader,
    input_bytes,
    is_hf_dataset,
    is_hf_dataset_dict,
    reader_for,
)
from moetrain.data.token_file import TokenDirWriter
from moetrain.data.tokenizer import Tokenizer, build_tokenizer

SUFFIXES = tuple(SUFFIX_READERS)
DEFAULT_CHUNK_BYTES = 4 << 20  # per task: large enough to amortize IPC, small for bounded memory
IN_FLIGHT_PER_WORKER = 2  # one chunk being tokenized, one queued: workers never wait on reading
START_METHOD = "forkserver"  # fork would copy a possibly threaded parent (torch, pyarrow pools)

Encoded = tuple[np.ndarray, np.ndarray]  # (tokens, per-document token counts with eos)

# Set once per worker process by _init_worker: its tokenizer, or why it could not be built.
_worker_tokenizer: Optional[Tokenizer | Exception] = None


# --- inputs -----------------------------------------------------------------------------------


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """The inputs to read: each INPUT itself, or a plain directory's inputs (sorted, recursive).

    Raises ``FileNotFoundError`` for a missing INPUT and ``ValueError`` for another suffix or a
    ``DatasetDict`` directory (one split must be chosen).
    """
    files: list[str] = []
    for path in inputs:
        if not os.path.exists(path):
            raise FileNotFoundError(f"INPUT {path!r} does not exist")
        if os.path.isdir(path):
            files.extend(_directory_inputs(path))
        elif file_reader(path) is None:
            raise ValueError(
                f"INPUT {path!r}: expected a .txt file (one document), a .jsonl file (one "
                "document per line; also .jsonl.gz, .jsonl.zst), a .parquet file, a datasets "
                "save_to_disk directory or a directory of them"
            )
        else:
            files.append(path)
    return files


def _directory_inputs(path: str) -> list[str]:
    """A ``datasets`` directory itself, else the inputs found under ``path``, sorted."""
    if is_hf_dataset(path):
        return [path]
    found = []
    for directory, subdirs, names in os.walk(path):
        if is_hf_dataset_dict(directory):
            splits = sorted(subdirs) or ["train"]
            raise ValueError(
                f"INPUT {directory!r} is a datasets DatasetDict (splits: {', '.join(splits)}); "
                f"give one split's directory, e.g. {os.path.join(directory, splits[0])}"
            )
        if is_hf_dataset(directory):
            found.append(directory)
            subdirs[:] = []  # its shards are read through state.json, not as files
            continue
        found.extend(os.path.join(directory, n) for n in names if file_reader(n) is not None)
    return sorted(found)


def iter_chunks(files: Sequence[str], text_key: str, chunk_bytes: int) -> Iterator[list[Piece]]:
    """The pieces of ``files`` in input order, grouped into chunks of about ``chunk_bytes``."""
    chunk: list[Piece] = []
    size = 0
    for path in files:
        reader = reader_for(path)
        assert reader is not None, path  # expand_inputs kept only readable inputs
        for piece in reader(path, text_key, chunk_bytes):
            chunk.append(piece)
            size += piece.nbytes
            if size >= chunk_bytes:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def iter_documents(path: str, text_key: str = "text") -> Iterator[str]:
    """The document texts of one input, in order (a convenience over ``moetrain.data.readers``)."""
    reader = reader_for(path)
    if reader is None:
        raise ValueError(f"INPUT {path!r}: not a known input kind")
    for piece in reader(path, text_key, DEFAULT_CHUNK_BYTES):
        yield from piece.documents()


# --- tokenizing: in process or in a pool ------------------------------------------------------


def encode_chunk(tok: Tokenizer, chunk: Sequence[Piece]) -> Encoded:
    """The tokens of a chunk's documents (each followed by eos) and each document's count."""
    texts = [text for piece in chunk for text in piece.documents()]
    tokens = tok.encode_documents(texts)
    return tokens, document_lengths(tok, texts, tokens)


def document_lengths(tok: Tokenizer, texts: Sequence[str], tokens: np.ndarray) -> np.ndarray:
    """Each document's token count, eos included, for ``tokens = encode_documents(texts)``."""
    ends = np.flatnonzero(tokens == tok.eos_id) + 1
    if len(ends) == len(texts):  # every document ends with eos, so none holds another one
        return np.diff(ends, prepend=0)
    # A text spelling out the eos token (HF tokenizers match special tokens in text): the eos
    # positions do not delimit documents, so count per document (the same tokens, one at a time).
    return np.array([len(tok.encode_documents([t])) for t in texts], dtype=np.int64)


def _init_worker(tokenizer: str) -> None:
    global _worker_tokenizer
    # The pool is the parallelism: N workers each running an all-core Rust thread pool in HF
    # encode_batch would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        _worker_tokenizer = build_tokenizer(tokenizer)
    except Exception as err:  # raised from the first task: a failing initializer makes
        _worker_tokenizer = err  # Pool respawn workers forever instead of reporting it


def _encode_in_worker(chunk: list[Piece]) -> Encoded:
    if isinstance(_worker_tokenizer, BaseException):
        raise _worker_tokenizer
    assert _worker_tokenizer is not None, "worker not initialized"
    return encode_chunk(_worker_tokenizer, chunk)


def encode_chunks(
    chunks: Iterable[list[Piece]], tokenizer: str, workers: int
) -> Generator[Encoded, None, None]:
    """``encode_chunk`` of every chunk, in chunk order; ``workers`` > 1 runs them in a pool.

    Close the generator (``contextlib.closing``) to stop the pool at once on an error.
    """
    if workers == 1:
        tok = build_tokenizer(tokenizer)
        for chunk in chunks:
            yield encode_chunk(tok, chunk)
        return
    ctx = multiprocessing.get_context(START_METHOD)
    # The fork server imports moetrain.data (and with it torch, seconds) once for all workers.
    # Not this module itself: a worker re-runs ``python -m``'s __main__ module by name, and
    # runpy warns when that module is already imported.
    ctx.set_forkserver_preload(["moetrain.data"])
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield from _ordered(pool, chunks, workers * IN_FLIGHT_PER_WORKER)


def _ordered(pool: Any, chunks: Iterable[list[Piece]], limit: int) -> Iterator[Encoded]:
    """Pool results in submission order, with at most ``limit`` chunks submitted and unread.

    (``Pool.imap`` would read its whole input ahead: unbounded memory.) A reading error waits
    for the chunks before it, so the error reported is the first in input order for any N.
    """
    pending: deque[Any] = deque()
    it = iter(chunks)
    exhausted = False
    while True:
        while not exhausted and len(pending) < limit:
            try:
                chunk = next(it)
            except StopIteration:
                exhausted = True
                break
            except Exception:
                for result in pending:
                    result.get()  # raises an earlier chunk's error instead
                raise
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
        if not pending:
            return
        yield pending.popleft().get()


# --- outputs ----------------------------------------------------------------------------------


def check_output(output: str, force: bool) -> None:
    """Refuse a non-empty ``--output`` directory unless ``force``; refuse a file in its place."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output!r} is a file; give a directory")
    if os.path.isdir(output) and os.listdir(output) and not force:
        raise ValueError(
            f"--output {output!r} exists and is not empty; pass --force to overwrite its "
            "tokens.bin/meta.json, or choose a new directory"
        )


def _write_tokens(output: str, tok: Tokenizer, results: Iterable[Encoded]) -> dict[str, Any]:
    with TokenDirWriter(output, tok) as writer:
        for tokens, lengths in results:
            writer.write(tokens, len(lengths))
        _require_documents(writer.num_documents)
        return writer.commit()


def _write_megatron(prefix: str, tok: Tokenizer, results: Iterable[Encoded]) -> dict[str, Any]:
    with MegatronWriter(prefix, tok.vocab_size) as writer:
        for tokens, lengths in results:
            writer.write(tokens, lengths)
        _require_documents(writer.num_documents)
        writer.commit()
    return {
        "format": "megatron",
        "prefix": prefix,
        "dtype": writer.dtype.name,
        "num_tokens": writer.num_tokens,
        "num_documents": writer.num_documents,
        "vocab_size": tok.vocab_size,
        "tokenizer": tok.name,
        "eos_id": tok.require_eos(),
    }


def _require_documents(count: int) -> None:
    if count == 0:
        raise ValueError("no documents found in the inputs")


@dataclass(frozen=True)
class OutputFormat:
    """How ``--format`` checks, places and writes its output."""

    check: Callable[[str, bool], None]
    directory: Callable[[str], str]  # the directory the output goes in
    write: Callable[[str, Tokenizer, Iterable[Encoded]], dict[str, Any]]


OUTPUT_FORMATS: dict[str, OutputFormat] = {
    "tokens": OutputFormat(check_output, lambda out: out, _write_tokens),
    "megatron": OutputFormat(
        check_prefix, lambda prefix: os.path.dirname(prefix) or ".", _write_megatron
    ),
}


@contextlib.contextmanager
def _made_or_restored(directory: str) -> Iterator[None]:
    """Create ``directory`` (and missing parents); remove those it created if the block fails."""
    created = []
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    try:
        yield
    except BaseException:
        for path in created:  # deepest first; stop at one something else has put a file in
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


# --- the command ------------------------------------------------------------------------------


@dataclass
class PrepareReport:
    """What ``run`` wrote (``meta``) and how fast: input bytes on disk, wall seconds, workers."""

    meta: dict[str, Any]
    input_bytes: int
    seconds: float
    workers: int

    def throughput(self) -> str:
        """One line: input MB/s, tokens/s, wall time and workers."""
        seconds = max(self.seconds, 1e-9)
        mb = self.input_bytes / 1e6
        return (
            f"throughput: {mb / seconds:,.1f} MB/s of input, "
            f"{self.meta['num_tokens'] / seconds / 1e6:,.2f} M tokens/s "
            f"({mb:,.1f} MB in {self.seconds:.2f} s, {self.workers} "
            f"worker{'s' if self.workers > 1 else ''})"
        )


def run(
    inputs: Sequence[str],
    output: str,
    tokenizer: str = BYTE_TOKENIZER,
    text_key: str = "text",
    force: bool = False,
    workers: int = 1,
    fmt: str = "tokens",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> PrepareReport:
    """Tokenize ``inputs`` into ``output`` in the format ``fmt``; return the report.

    Raises ``FileNotFoundError``/``ValueError`` (one line) for a missing input, bad content
    (naming the file and line or row), an unknown tokenizer, no documents, or an output in the
    way without ``force``; the output is then as it was before. With ``workers`` > 1 a script
    must call this under ``if __name__ == "__main__":`` (a forkserver worker imports the main
    module).
    """
    start = time.perf_counter()
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"--format {fmt!r}: choose from {', '.join(OUTPUT_FORMATS)}")
    files = expand_inputs(inputs)
    if not files:
        raise ValueError(f"no inputs ({', '.join(SUFFIXES)}, datasets directories) in {inputs}")
    out = OUTPUT_FORMATS[fmt]
    out.check(output, force)
    tok = build_tokenizer(tokenizer)
    tok.require_eos()
    total = sum(input_bytes(path) for path in files)
    chunks = iter_chunks(files, text_key, max(1, chunk_bytes))
    with (
        _made_or_restored(out.directory(output)),
        contextlib.closing(encode_chunks(chunks, tokenizer, workers)) as results,
    ):
        meta = out.write(output, tok, results)
    return PrepareReport(meta, total, time.perf_counter() - start, workers)


def prepare(
    inputs: Sequence[str],
    output: str,
    tokenizer: str = BYTE_TOKENIZER,
    text_key: str = "text",
    force: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """``run`` returning only the meta (``workers``, ``fmt``, ``chunk_bytes`` as ``options``)."""
    return run(inputs, output, tokenizer, text_key, force, **options).meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; prints a summary and the throughput, or ``error: ...`` and returns 2."""
    parser = argparse.ArgumentParser(
        prog="python -m moetrain.data.prepare",
        description="Tokenize text files into a directory for data.source=tokens, or into a "
        "Megatron-LM indexed dataset.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=f"{', '.join(SUFFIXES)}, dir")
    parser.add_argument("--output", required=True, metavar="DIR|PREFIX", help="output")
    parser.add_argument("--tokenizer", default=BYTE_TOKENIZER, help="'byte' or a tokenizer.json")
    parser.add_argument("--text-key", default="text", help="jsonl key / column holding the text")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--format", default="tokens", choices=list(OUTPUT_FORMATS))
    parser.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_BYTES / 2**20)
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args(argv)
    try:
        report = run(
            args.inputs,
            args.output,
            args.tokenizer,
            args.text_key,
            args.force,
            workers=args.workers,
            fmt=args.format,
            chunk_bytes=int(args.chunk_mb * 2**20),
        )
    except (ValueError, OSError) as err:
        # Arrow and OS messages may span lines; the contract is one line per error.
        print(
            f"error: {'; '.join(s.strip() for s in str(err).splitlines() if s.strip())}",
            file=sys.stderr,
        )
        return 2
    meta = report.meta
    print(
        f"wrote {meta['num_tokens']:,} tokens ({meta['num_documents']:,} documents, "
        f"{meta['dtype']}, tokenizer {meta['tokenizer']}) to {args.output}"
    )
    print(report.throughput())
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so the functions sent to the workers are named
    # moetrain.data.prepare.*, which a forkserver worker can import (__main__.* it cannot).
    from moetrain.data.prepare import main as _main

    sys.exit(_main())
