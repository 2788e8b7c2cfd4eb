"""``MegatronIndexedDataset`` against Megatron-Core 0.16's own writer and reader.

The datasets are written by Megatron's ``IndexedDatasetBuilder`` (several documents of different
lengths, one of two sequences, one empty document, one empty sequence) and every sequence, the
sequence lengths and the document indices read by moetrain must equal what Megatron's
``IndexedDataset`` reads, for int32 and uint16 tokens.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # Megatron warns at import that Apex/TE are missing
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    mcore_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

from moetrain.data.megatron_indexed import MegatronIndexedDataset

DTYPES = [np.int32, np.uint16]


def _documents(dtype: type, seed: int = 0) -> list[list[np.ndarray]]:
    """Documents as lists of sequences; token values span the dtype (sign / high bits)."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    low, high = max(int(info.min), -(2**31)), min(int(info.max), 2**31 - 1)

    def tokens(n: int) -> np.ndarray:
        return rng.integers(low, high, size=n, endpoint=True).astype(dtype)

    return [
        [tokens(7)],
        [tokens(1)],
        [],  # an empty document
        [tokens(300), tokens(4)],  # a document of two sequences
        [tokens(0)],  # an empty sequence
        [tokens(33)],
    ]


def _build(tmp_path: Path, dtype: type) -> tuple[str, list[list[np.ndarray]]]:
    """Write ``_documents(dtype)`` with Megatron's builder; return (prefix, documents)."""
    prefix = str(tmp_path / f"corpus_{np.dtype(dtype).name}")
    docs = _documents(dtype)
    builder = mcore_indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        for seq in doc:
            builder.add_item(torch.from_numpy(seq.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix, docs


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_sequence_matches_megatron_reader(tmp_path: Path, dtype: type) -> None:
    prefix, docs = _build(tmp_path, dtype)
    ours = MegatronIndexedDataset(prefix)
    theirs = mcore_indexed.IndexedDataset(prefix)
    assert ours.dtype == np.dtype(theirs.index.dtype) == np.dtype(dtype)
    assert ours.num_sequences == len(ours) == len(theirs) == sum(len(d) for d in docs)
    for i in range(len(theirs)):
        mine, ref = ours.sequence(i), theirs[i]
        assert mine.dtype == ref.dtype and np.array_equal(mine, ref), f"sequence {i}"
    assert np.array_equal(ours.sequence_lengths, theirs.sequence_lengths)
    assert np.array_equal(ours.sequence_pointers, theirs.index.sequence_pointers)
    assert np.array_equal(ours.document_boundaries, theirs.document_indices)
    assert ours.num_documents == len(theirs.document_indices) - 1 == len(docs)
    assert ours.num_tokens == int(theirs.sequence_lengths.sum()) == 345


@pytest.mark.parametrize("dtype", DTYPES)
def test_documents_concatenate_their_sequences(tmp_path: Path, dtype: type) -> None:
    prefix, docs = _build(tmp_path, dtype)
    ours = MegatronIndexedDataset(prefix)
    theirs = mcore_indexed.IndexedDataset(prefix)
    bounds = theirs.document_indices
    for j, doc in enumerate(docs):
        expected = np.concatenate(doc) if doc else np.empty(0, dtype=dtype)
        from_megatron = [theirs[i] for i in range(bounds[j], bounds[j + 1])]
        got = ours.document(j)
        assert got.dtype == np.dtype(dtype) and np.array_equal(got, expected), f"document {j}"
        assert np.array_equal(got, np.concatenate(from_megatron) if from_megatron else got[:0])
    assert ours.document(2).size == 0  # the empty document


def test_views_are_read_only_and_zero_copy(tmp_path: Path) -> None:
    prefix, _ = _build(tmp_path, np.int32)
    ours = MegatronIndexedDataset(prefix)
    for view in (ours.sequence(3), ours.document(3), ours.sequence_lengths):
        assert not view.flags.owndata and not view.flags.writeable
        with pytest.raises(ValueError):
            view[:1] = 0


def test_document_of_non_adjacent_sequences_is_concatenated(tmp_path: Path) -> None:
    """Sequence 1 stored before sequence 0 in ``.bin``: ``document`` must follow the index."""
    prefix = tmp_path / "swapped"
    tokens = np.arange(5, dtype="<u2")  # seq 0 = tokens[2:5] at byte 4, seq 1 = tokens[0:2] at 0
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 2, 2)
    arrays = [np.array([3, 2], "<i4"), np.array([4, 0], "<i8"), np.array([0, 2], "<i8")]
    Path(f"{prefix}.idx").write_bytes(header + b"".join(a.tobytes() for a in arrays))
    Path(f"{prefix}.bin").write_bytes(tokens.tobytes())
    ours = MegatronIndexedDataset(prefix)
    assert ours.sequence(0).tolist() == [2, 3, 4] and ours.sequence(1).tolist() == [0, 1]
    assert ours.document(0).tolist() == [2, 3, 4, 0, 1]


def test_out_of_range_indices_raise(tmp_path: Path) -> None:
    prefix, docs = _build(tmp_path, np.uint16)
    ours = MegatronIndexedDataset(prefix)
    for bad in (-1, ours.num_sequences):
        with pytest.raises(IndexError, match="sequence"):
            ours.sequence(bad)
    with pytest.raises(IndexError, match="document"):
        ours.document(len(docs))


def _error(exc: type[Exception], prefix: str) -> str:
    """The one-line message of opening ``prefix``, which must raise ``exc``."""
    with pytest.raises(exc) as info:
        MegatronIndexedDataset(prefix)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("suffix", [".idx", ".bin"])
def test_missing_file_is_named(tmp_path: Path, suffix: str) -> None:
    prefix, _ = _build(tmp_path, np.int32)
    Path(prefix + suffix).unlink()
    assert f"{prefix}{suffix}: not found" in _error(FileNotFoundError, prefix)


def test_prefix_with_extension_gets_a_hint(tmp_path: Path) -> None:
    prefix, _ = _build(tmp_path, np.int32)
    assert f"without the extension ('{prefix}')" in _error(FileNotFoundError, prefix + ".bin")


def test_truncated_bin_is_named(tmp_path: Path) -> None:
    prefix, _ = _build(tmp_path, np.uint16)
    bin_path = Path(prefix + ".bin")
    bin_path.write_bytes(bin_path.read_bytes()[:-1])
    message = _error(ValueError, prefix)
    assert message.startswith(f"{bin_path}: ") and "shorter than its index" in message


def _patch_idx(prefix: str, offset: int, data: bytes) -> None:
    path = Path(prefix + ".idx")
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("offset", "data", "phrase"),
    [
        (0, b"MMIDIDY", "not a Megatron indexed-dataset index"),
        (9, struct.pack("<Q", 2), "index version 2"),
        (17, struct.pack("<B", 9), "unknown token dtype code 9"),
    ],
)
def test_corrupt_header_names_the_idx(
    tmp_path: Path, offset: int, data: bytes, phrase: str
) -> None:
    prefix, _ = _build(tmp_path, np.int32)
    _patch_idx(prefix, offset, data)
    message = _error(ValueError, prefix)
    assert message.startswith(f"{prefix}.idx: ") and phrase in message


@pytest.mark.parametrize("keep", [20, 60])  # inside the header / inside the arrays
def test_truncated_idx_is_named(tmp_path: Path, keep: int) -> None:
    prefix, _ = _build(tmp_path, np.int32)
    idx_path = Path(prefix + ".idx")
    idx_path.write_bytes(idx_path.read_bytes()[:keep])
    message = _error(ValueError, prefix)
    assert message.startswith(f"{idx_path}: truncated index")
