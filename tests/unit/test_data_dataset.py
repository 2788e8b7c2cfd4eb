"""Prepared-token source, windows, and build_datasets for both sources."""

import json

import numpy as np
import pytest
import torch
from test_data_tokenizer import make_hf_tokenizer  # tests/unit is on sys.path (rootdir mode)

from moetrain.data import corpus
from moetrain.data.config import DataConfig
from moetrain.data.dataset import TokenSource, WindowDataset, build_datasets
from moetrain.data.prepare import prepare
from moetrain.data.tokenizer import ByteTokenizer, build_tokenizer


@pytest.fixture
def token_dir(tmp_path):
    """A prepared byte-token directory of 20 documents (~600 tokens)."""
    jsonl = tmp_path / "docs.jsonl"
    docs = [f"document number {i}: " + "abc" * (i % 5) for i in range(20)]
    jsonl.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    out = tmp_path / "prepared"
    prepare([str(jsonl)], str(out))
    return out


def test_token_source_and_split(token_dir):
    src = TokenSource(str(token_dir))
    meta = json.loads((token_dir / "meta.json").read_text())
    assert len(src) == meta["num_tokens"]
    assert src.tokens[-1] == 257 and src.max_token_id() == 257
    train, val = src.split(0.1)
    assert len(val) == -(-len(src) // 10)  # ceil
    assert np.array_equal(np.concatenate([train, val]), src.tokens)


def test_truncated_tokens_file(token_dir):
    with open(token_dir / "tokens.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"data\.path.*tokens\.bin.*re-run prepare"):
        TokenSource(str(token_dir))


def test_missing_meta_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.path.*meta\.json"):
        TokenSource(str(tmp_path))


def test_vocab_too_small_names_model_vocab_size(token_dir):
    src = TokenSource(str(token_dir))
    src.validate_vocab(258)
    with pytest.raises(ValueError, match=r"model\.vocab_size.*tokens\.bin.*>= 258"):
        src.validate_vocab(257)
    cfg = DataConfig(source="tokens", path=str(token_dir))
    with pytest.raises(ValueError, match=r"model\.vocab_size"):
        build_datasets(cfg, ByteTokenizer(), 8, 256)


def test_windows_shifted_by_one():
    tokens = np.arange(23, dtype=np.uint16)
    ds = WindowDataset(tokens, 5)
    assert len(ds) == (23 - 1) // 5 == 4
    x, y = ds[1]
    assert x.dtype == torch.long and x.tolist() == [5, 6, 7, 8, 9]
    assert y.tolist() == [6, 7, 8, 9, 10]
    x_BS, y_BS = ds.batch([3, 0])
    assert x_BS.shape == (2, 5) and torch.equal(x_BS[:, 1:], y_BS[:, :-1])
    assert x_BS[0].tolist() == [15, 16, 17, 18, 19] and y_BS[0, -1] == 20
    with pytest.raises(IndexError):
        ds[4]
    assert len(WindowDataset(np.arange(21), 5)) == 4  # exactly 4*5+1 tokens


def test_fixed_batches_are_fixed_and_spread():
    ds = WindowDataset(np.arange(101), 10)  # 10 windows
    a = ds.fixed_batches(2, 2)
    b = ds.fixed_batches(2, 2)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert [int(x[i, 0]) // 10 for x, _ in a for i in range(2)] == [0, 2, 5, 7]
    assert len(ds.fixed_batches(3, 4)) == 3  # more windows than exist: repeats


def test_build_datasets_tokens(token_dir):
    cfg = DataConfig(source="tokens", path=str(token_dir), val_fraction=0.2)
    train, val, meta = build_datasets(cfg, ByteTokenizer(), 16, 259)
    assert meta["source"] == "tokens" and meta["num_documents"] == 20
    assert meta["train_tokens"] + meta["val_tokens"] == meta["num_tokens"]
    assert len(train) == meta["train_windows"] > len(val) == meta["val_windows"] > 0


def test_too_small_names_seq_len(token_dir):
    cfg = DataConfig(source="tokens", path=str(token_dir), val_fraction=0.05)
    with pytest.raises(ValueError, match=r"train\.seq_len.*val split"):
        build_datasets(cfg, ByteTokenizer(), 64, 259)


def test_missing_path_names_prepare(tmp_path):
    cfg = DataConfig(source="tokens", path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"data\.path.*moetrain\.data\.prepare"):
        build_datasets(cfg, ByteTokenizer(), 8, 259)


def test_tokenizer_mismatch(token_dir, tmp_path):
    hf = build_tokenizer(make_hf_tokenizer(tmp_path / "t.json"))
    cfg = DataConfig(source="tokens", path=str(token_dir))
    with pytest.raises(ValueError, match=r"data\.tokenizer.*prepared with"):
        build_datasets(cfg, hf, 8, 1000)


def test_build_datasets_stdlib_on_fake_root(tmp_path, monkeypatch):
    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n" * 20)
    monkeypatch.setattr(corpus, "stdlib_root", lambda: str(tmp_path))
    train, val, meta = build_datasets(DataConfig(val_fraction=0.2), ByteTokenizer(), 32, 259)
    assert meta["source"] == "stdlib" and meta["stdlib_root"] == str(tmp_path)
    assert meta["train_files"] + meta["val_files"] == 40
    assert meta["train_tokens"] == meta["train_bytes"] + meta["train_files"]
    assert len(train) > 0 and len(val) > 0
