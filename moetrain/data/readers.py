"""Input readers of ``python -m moetrain.data.prepare``: one function per input format.

A reader ``read_*(path, text_key, piece_bytes)`` streams one input and yields ``Piece``s: runs of
consecutive raw records of about ``piece_bytes`` bytes, in input order. Reading (file I/O,
decompression, Arrow decoding) happens in the process that calls the reader; turning a piece's
records into document texts (``Piece.documents``: UTF-8 and JSON decoding, the checks) is meant
for the worker processes, so the CPU-heavy part of a ``.jsonl`` scales with ``--workers``.

Formats (``SUFFIX_READERS`` maps a file suffix to its reader; ``reader_for`` also knows
directories): ``.txt`` one document; ``.jsonl`` one document per non-blank line, its text under
``text_key``; ``.jsonl.gz`` (stdlib gzip) and ``.jsonl.zst`` (``zstandard``) the same compressed;
``.parquet`` the ``text_key`` column, read in record batches; a Hugging Face ``datasets``
directory written by ``save_to_disk`` (``state.json`` + Arrow IPC stream shards), read with
pyarrow alone. pyarrow and zstandard are imported only when such an input is read.

Every error is a ``ValueError`` whose message is one line naming the input and the line (``.jsonl``,
1-based) or row (parquet/Arrow, 0-based) and the fix.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

HF_STATE = "state.json"
HF_INFO = "dataset_info.json"
HF_DATASET_DICT = "dataset_dict.json"
_ROWS_PER_BATCH = 1024  # parquet rows decoded at a time: bounded memory even for huge row groups
_ZSTD_READ = 1 << 20  # compressed bytes fed to zstd at a time


@dataclass
class Piece:
    """Consecutive raw records of one input: ``records[i]`` is at line/row ``first + i``.

    ``decode`` is a module-level function (picklable by name) turning the records into texts.
    """

    source: str  # how errors name the input
    first: int
    records: list[Any]
    nbytes: int
    decode: Callable[[Piece], list[str]]
    text_key: str

    def documents(self) -> list[str]:
        """The document texts of the records; ``ValueError`` naming the line/row if one is bad."""
        return self.decode(self)


Reader = Callable[[str, str, int], Iterator[Piece]]


# --- decoders: records -> texts (run in the workers) ------------------------------------------


def decode_txt(piece: Piece) -> list[str]:
    """A ``.txt`` piece: its one record is the file's bytes, one document."""
    try:
        return [piece.records[0].decode("utf-8")]
    except UnicodeDecodeError as err:
        raise ValueError(f"{piece.source}: not UTF-8 text ({err}); convert it to UTF-8") from err


def decode_jsonl(piece: Piece) -> list[str]:
    """A ``.jsonl`` piece: one JSON object per line, blank lines skipped."""
    texts = []
    for i, line in enumerate(piece.records):
        if line.strip():
            texts.append(_jsonl_text(line, piece.text_key, f"{piece.source}:{piece.first + i}"))
    return texts


def decode_strings(piece: Piece) -> list[str]:
    """A parquet/Arrow piece: the records are the texts (checked when read)."""
    return list(piece.records)


def _jsonl_text(line: bytes, text_key: str, where: str) -> str:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 ({err}); convert the file to UTF-8") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err}); fix or drop the line") from err
    if not isinstance(record, dict) or text_key not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{where}: no key {text_key!r} (found: {keys}); set --text-key to the key that "
            "holds the document text"
        )
    text = record[text_key]
    if not isinstance(text, str):
        raise ValueError(f"{where}: {text_key!r} holds a {type(text).__name__}, not a string")
    if b"\\u" in line:  # only a \u escape can smuggle a lone surrogate past the UTF-8 decode
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"{where}: {text_key!r} has an unpaired surrogate escape ({err}); fix the text"
            ) from err
    return text


# --- readers: input -> pieces (run in the main process) ---------------------------------------


def read_txt(path: str, text_key: str, piece_bytes: int) -> Iterator[Piece]:
    """A ``.txt`` file is one document: it is read whole (the one unbounded input)."""
    with open(path, "rb") as f:
        data = f.read()
    yield Piece(path, 1, [data], len(data), decode_txt, text_key)


def read_jsonl(path: str, text_key: str, piece_bytes: int) -> Iterator[Piece]:
    """A ``.jsonl`` file, streamed line by line."""
    with open(path, "rb") as f:
        yield from _pieces(path, f, 1, decode_jsonl, text_key, piece_bytes)


def read_jsonl_gz(path: str, text_key: str, piece_bytes: int) -> Iterator[Piece]:
    """A gzip-compressed ``.jsonl`` file, decompressed as it streams."""
    with gzip.open(path, "rb") as f:
        lines = _guarded_lines(path, f, (EOFError, OSError, zlib.error), "gzip")
        yield from _pieces(path, lines, 1, decode_jsonl, text_key, piece_bytes)


def read_jsonl_zst(path: str, text_key: str, piece_bytes: int) -> Iterator[Piece]:
    """A zstandard-compressed ``.jsonl`` file (any number of frames), decompressed as it streams."""
    try:
        import zstandard
    except ImportError as err:
        raise ValueError(
            f"{path}: reading .jsonl.zst needs zstandard: pip install zstandard "
            "(or pip install 'moetrain[data]')"
        ) from err
    with open(path, "rb") as f:
        blocks = _zstd_blocks(f, zstandard)
        lines = _guarded_lines(path, _split_lines(blocks), (zstandard.ZstdError,), "zstd")
        yield from _pieces(path, lines, 1, decode_jsonl, text_key, piece_bytes)


def read_parquet(path: str, text_key: str, piece_bytes: int) -> Iterator[Piece]:
    """A parquet file's ``text_key`` column, ``_ROWS_PER_BATCH`` rows decoded at a time."""
    pa = _pyarrow(path)
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({err}); re-create it") from err
    _check_column(path, parquet.schema_arrow, text_key)
    batches = parquet.iter_batches(batch_size=_ROWS_PER_BATCH, columns=[text_key])
    texts = _column_texts(pa, path, batches, text_key, 0)
    yield from _pieces(path, texts, 0, decode_strings, text_key, piece_bytes)


def read_hf_dataset(path: str, text_key: str, piece_bytes: int) -> Iterator[Piece]:
    """A ``datasets`` ``save_to_disk`` directory: its Arrow stream shards in ``state.json`` order.

    Errors name the shard and the row as ``dataset[row]`` numbers it (counted across shards).
    """
    pa = _pyarrow(path)
    texts = _hf_texts(pa, hf_data_files(path), text_key)
    yield from _pieces(path, texts, 0, decode_strings, text_key, piece_bytes)


def _hf_texts(pa: Any, shards: list[str], text_key: str) -> Iterator[str]:
    row = 0
    for shard in shards:
        with pa.memory_map(shard) as source:
            try:
                stream = pa.ipc.open_stream(source)
            except (pa.ArrowException, OSError) as err:
                raise ValueError(
                    f"{shard}: not an Arrow IPC stream ({err}); re-save the dataset with "
                    "save_to_disk"
                ) from err
            _check_column(shard, stream.schema, text_key)
            row = yield from _column_texts(pa, shard, stream, text_key, row)


SUFFIX_READERS: dict[str, Reader] = {
    ".txt": read_txt,
    ".jsonl": read_jsonl,
    ".jsonl.gz": read_jsonl_gz,
    ".jsonl.zst": read_jsonl_zst,
    ".parquet": read_parquet,
}


def reader_for(path: str) -> Reader | None:
    """The reader of ``path``: a ``datasets`` directory or a file with a known suffix, else None."""
    if os.path.isdir(path):
        return read_hf_dataset if is_hf_dataset(path) else None
    return file_reader(path)


def file_reader(name: str) -> Reader | None:
    """The reader of a file named ``name`` (by suffix), or None."""
    for suffix, reader in SUFFIX_READERS.items():
        if name.endswith(suffix):
            return reader
    return None


def is_hf_dataset(path: str) -> bool:
    """Whether ``path`` is a directory written by ``datasets.Dataset.save_to_disk``."""
    return all(os.path.isfile(os.path.join(path, name)) for name in (HF_STATE, HF_INFO))


def is_hf_dataset_dict(path: str) -> bool:
    """Whether ``path`` is a ``DatasetDict.save_to_disk`` directory (one subdirectory a split)."""
    return os.path.isfile(os.path.join(path, HF_DATASET_DICT))


def hf_data_files(path: str) -> list[str]:
    """The Arrow shards of a ``datasets`` directory, in ``state.json`` ``_data_files`` order."""
    state_path = os.path.join(path, HF_STATE)
    try:
        with open(state_path, encoding="utf-8") as f:
            names = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{state_path}: not a datasets state.json with _data_files ({err!r}); re-save the "
            "dataset with save_to_disk"
        ) from err
    shards = [os.path.join(path, name) for name in names]
    for shard in shards:
        if not os.path.isfile(shard):
            raise ValueError(
                f"{state_path} lists {os.path.basename(shard)}, which is missing; re-save the "
                "dataset with save_to_disk"
            )
    return shards


def input_bytes(path: str) -> int:
    """The bytes on disk of an input (a ``datasets`` directory: its shards), for throughput."""
    if os.path.isdir(path):
        return sum(os.path.getsize(shard) for shard in hf_data_files(path))
    return os.path.getsize(path)


# --- helpers ----------------------------------------------------------------------------------


def _pieces(
    source: str,
    records: Iterable[Any],
    first: int,
    decode: Callable[[Piece], list[str]],
    text_key: str,
    piece_bytes: int,
) -> Iterator[Piece]:
    """Group ``records`` (bytes or str, numbered from ``first``) into pieces of ~piece_bytes."""
    batch: list[Any] = []
    nbytes = 0
    for record in records:
        batch.append(record)
        nbytes += len(record)
        if nbytes >= piece_bytes:
            yield Piece(source, first, batch, nbytes, decode, text_key)
            first += len(batch)
            batch, nbytes = [], 0
    if batch:
        yield Piece(source, first, batch, nbytes, decode, text_key)


def _guarded_lines(
    path: str, lines: Iterable[bytes], errors: tuple[type[BaseException], ...], what: str
) -> Iterator[bytes]:
    """``lines``, with a decompression error turned into one line naming the file and line."""
    count = 0
    try:
        for line in lines:
            count += 1
            yield line
    except errors as err:
        raise ValueError(
            f"{path}: corrupt or truncated {what} data after line {count} ({err}); re-create or "
            "re-download the file"
        ) from err


def _zstd_blocks(f: Any, zstandard: Any) -> Iterator[bytes]:
    """Decompressed blocks of a zstd file; raises at the end if its last frame is cut short.

    ``zstandard``'s stream reader returns a truncated frame's bytes as if complete, so the
    frames are decoded here to see whether the last one reached its end.
    """
    dobj = zstandard.ZstdDecompressor().decompressobj()
    pending = False  # compressed bytes fed to a frame that has not ended yet
    while data := f.read(_ZSTD_READ):
        while data:
            pending = True
            out = dobj.decompress(data)
            if out:
                yield out
            data = b""
            if dobj.eof:  # a frame ended: the rest (if any) starts the next one
                data, pending = dobj.unused_data, False
                dobj = zstandard.ZstdDecompressor().decompressobj()
    if pending:
        raise zstandard.ZstdError("the input ends inside a frame")


def _split_lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """The ``\\n``-terminated lines of a stream of byte blocks (the last may lack the ``\\n``)."""
    tail: list[bytes] = []
    for block in blocks:
        parts = block.split(b"\n")
        if len(parts) == 1:
            tail.append(block)
            continue
        tail.append(parts[0])
        yield b"".join(tail)
        yield from parts[1:-1]
        tail = [parts[-1]] if parts[-1] else []
    if tail:
        yield b"".join(tail)


def _pyarrow(path: str) -> Any:
    """The pyarrow module, or a one-line error naming ``path`` and the install command."""
    try:
        import pyarrow
    except ImportError as err:
        raise ValueError(
            f"{path}: reading parquet/Arrow inputs needs pyarrow: pip install pyarrow "
            "(or pip install 'moetrain[data]')"
        ) from err
    return pyarrow


def _check_column(path: str, schema: Any, text_key: str) -> None:
    """Raise unless ``schema`` has a string column ``text_key``."""
    import pyarrow as pa

    if text_key not in schema.names:
        raise ValueError(
            f"{path}: no column {text_key!r} (columns: {', '.join(schema.names)}); set "
            "--text-key to the column that holds the document text"
        )
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(
            f"{path}: column {text_key!r} holds {kind}, not strings; set --text-key to the "
            "column that holds the document text"
        )


def _column_texts(
    pa: Any, source: str, batches: Iterable[Any], text_key: str, row: int
) -> Generator[str, None, int]:
    """The strings of ``text_key`` over record ``batches`` (rows numbered from ``row``).

    Returns the row after the last. Raises one line naming ``source`` and the row for a null
    or a read error.
    """
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return row
        except (pa.ArrowException, OSError) as err:
            raise ValueError(
                f"{source}: unreadable after row {row} ({err}); re-create the file"
            ) from err
        column = batch.column(text_key)
        texts = column.to_pylist()
        if column.null_count:
            raise ValueError(
                f"{source}: row {row + texts.index(None)}: {text_key!r} is null, not a string; "
                "drop or fill such rows"
            )
        yield from texts
        row += len(texts)
