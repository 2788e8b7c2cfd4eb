"""prepare --format megatron: Megatron-Core 0.16's own reader reads back exactly what was written.

One sequence per document (its tokens, then eos: the tokens format's tokens), document indices
``0..num_documents``, uint16 up to 65,536 ids else int32; both files replaced atomically.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from test_data_tokenizer import make_hf_tokenizer  # tests/unit is on sys.path (rootdir mode)
from test_prepare_formats import snapshot, write_input

from moetrain.data.megatron_indexed import MegatronIndexedDataset
from moetrain.data.megatron_writer import MegatronWriter, megatron_dtype
from moetrain.data.prepare import main, prepare
from moetrain.data.tokenizer import build_tokenizer

with warnings.catch_warnings():  # Megatron warns at import that Apex/TE are missing
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    mcore_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

pytestmark = pytest.mark.timeout(60)

DOCS = ["first", "", "zweites Dokument: é ü 世界", "a <eos> inside", "x" * 1000]


def assert_reads_back(prefix: str, expected: list[np.ndarray], dtype: np.dtype) -> None:
    """Megatron's IndexedDataset and ours read ``expected`` (one sequence per document)."""
    theirs = mcore_indexed.IndexedDataset(prefix)
    ours = MegatronIndexedDataset(prefix)
    assert np.dtype(theirs.index.dtype) == ours.dtype == dtype
    assert len(theirs) == len(ours) == len(expected)
    assert theirs.document_indices.tolist() == list(range(len(expected) + 1))
    assert np.array_equal(ours.document_boundaries, theirs.document_indices)
    for i, seq in enumerate(expected):
        assert np.array_equal(theirs[i], seq), f"sequence {i}"
        assert np.array_equal(ours.document(i), seq), f"document {i}"


@pytest.mark.parametrize("tokenizer", ["byte", "hf"])
def test_megatron_core_reads_the_documents(tmp_path: Path, tokenizer: str) -> None:
    path = make_hf_tokenizer(tmp_path / "tok.json") if tokenizer == "hf" else "byte"
    tok = build_tokenizer(path)
    inputs = [write_input(tmp_path, "jsonl", DOCS)]
    prefix = str(tmp_path / "mg" / "corpus")
    meta = prepare(inputs, prefix, path, fmt="megatron", workers=2, chunk_bytes=16)
    assert (meta["num_documents"], meta["dtype"]) == (len(DOCS), "uint16")
    # The HF tokenizer reads the literal "<eos>" as the eos id; it stays inside its document.
    expected = [np.array([*tok.encode(d), tok.eos_id], dtype=np.uint16) for d in DOCS]
    assert_reads_back(prefix, expected, np.dtype(np.uint16))
    tokens_meta = prepare(inputs, str(tmp_path / "tok_dir"), path)
    flat = np.fromfile(tmp_path / "tok_dir" / "tokens.bin", dtype="<u2")
    assert tokens_meta["num_tokens"] == meta["num_tokens"]
    assert np.array_equal(flat, np.concatenate(expected))  # the same tokens as --format tokens
    assert sorted(p.name for p in (tmp_path / "mg").iterdir()) == ["corpus.bin", "corpus.idx"]


def test_int32_tokens_above_65536_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70_000, size=n) for n in (5, 0, 300, 1)]
    prefix = str(tmp_path / "big")
    with MegatronWriter(prefix, vocab_size=70_000) as writer:
        writer.write(np.concatenate(docs[:2]), np.array([5, 0]))
        writer.write(np.concatenate(docs[2:]), np.array([300, 1]))
        writer.commit()
    assert_reads_back(prefix, [d.astype(np.int32) for d in docs], np.dtype(np.int32))


def test_dtype_choice() -> None:
    assert megatron_dtype(65_536) == (np.dtype("<u2"), 8)
    assert megatron_dtype(65_537) == (np.dtype("<i4"), 4)


def test_existing_prefix_needs_force_and_is_replaced(tmp_path: Path, capsys) -> None:
    prefix = str(tmp_path / "c")
    old = write_input(tmp_path, "txt", ["old"], name="old")
    new = write_input(tmp_path, "txt", ["new text"], name="new")
    assert main([old, "--output", prefix, "--format", "megatron"]) == 0
    assert main([new, "--output", prefix, "--format", "megatron"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([new, "--output", prefix, "--format", "megatron", "--force"]) == 0
    assert MegatronIndexedDataset(prefix).sequence(0).tolist() == [*b"new text", 257]
    assert main([new, "--output", prefix + ".bin", "--format", "megatron"]) == 2
    assert "without .bin/.idx" in capsys.readouterr().err


def test_a_failure_leaves_the_old_dataset(tmp_path: Path, capsys) -> None:
    prefix = str(tmp_path / "out" / "c")
    assert (
        main([write_input(tmp_path, "txt", ["old"]), "--output", prefix, "--format", "megatron"])
        == 0
    )
    before = snapshot(tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n' * 100 + b'{"text": 1}\n')
    argv = [str(bad), "--output", prefix, "--format", "megatron", "--force", "--workers", "2"]
    assert main([*argv, "--chunk-mb", "0.0001"]) == 2
    assert f"{bad}:101:" in capsys.readouterr().err
    assert snapshot(tmp_path / "out") == before  # no temp .bin/.idx/lengths left behind
