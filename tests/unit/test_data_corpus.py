"""The built-in stdlib corpus: file list, exclusions, hash split, token loading."""

import hashlib

import numpy as np
import pytest

from moetrain.data import corpus
from moetrain.data.tokenizer import ByteTokenizer


def make_tree(root):
    files = {
        "a.py": "print('a')\n",
        "pkg/__init__.py": "",
        "pkg/b.py": "x = 'é'\n",
        "pkg/sub/c.py": "def c():\n    return 1\n",
        "latin1.py": b"# \xe9\n",
        "notes.txt": "not python",
        "site-packages/torch/x.py": "skip",
        "pkg/dist-packages/y.py": "skip",
        "__pycache__/a.py": "skip",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(root)


def test_files_sorted_and_excluded(tmp_path):
    root = make_tree(tmp_path)
    files = corpus.stdlib_files(root)
    assert files == ["a.py", "latin1.py", "pkg/__init__.py", "pkg/b.py", "pkg/sub/c.py"]


def test_split_rule_matches_spec():
    for rel in ("os.py", "asyncio/tasks.py", "test/test_os.py"):
        h = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16)
        assert corpus.is_val(rel, 0.05) == (h % 10000 < 500)


def test_split_disjoint_and_fraction():
    paths = [f"pkg{i % 37}/mod_{i}.py" for i in range(5000)]
    val = {p for p in paths if corpus.is_val(p, 0.1)}
    assert 0.08 < len(val) / len(paths) < 0.12
    assert {p for p in paths if corpus.is_val(p, 0.1)} == val  # stable
    # a larger fraction only adds files: a file never leaves val
    assert val <= {p for p in paths if corpus.is_val(p, 0.2)}


def test_split_files_partition(tmp_path):
    root = make_tree(tmp_path)
    train = corpus.split_files("train", 0.5, root)
    val = corpus.split_files("val", 0.5, root)
    assert not set(train) & set(val)
    assert sorted(train + val) == corpus.stdlib_files(root)
    with pytest.raises(ValueError, match="split"):
        corpus.split_files("test", 0.5, root)


def test_load_tokens_decode_back(tmp_path):
    root = make_tree(tmp_path)
    tok = ByteTokenizer()
    for split in corpus.SPLITS:
        files = corpus.split_files(split, 0.5, root)
        tokens = corpus.load_stdlib_tokens(split, tok, 0.5, root)
        assert tokens.dtype == np.uint16
        assert int((tokens == tok.eos_id).sum()) == len(files)
        docs = np.split(tokens, np.flatnonzero(tokens == tok.eos_id) + 1)[:-1]
        for rel, doc in zip(files, docs):
            raw = (tmp_path / rel).read_bytes()
            assert tok.decode(doc.tolist()) == raw.decode("utf-8", errors="replace")


def test_real_stdlib_file_list():
    """The one test on the real stdlib: listing only (no tokenizing)."""
    files = corpus.stdlib_files()
    assert files == corpus.stdlib_files()
    assert len(files) > 500
    assert "os.py" in files
    assert not any("site-packages" in f or "dist-packages" in f for f in files)
    assert files == sorted(files)
    meta = corpus.corpus_metadata(0.2)
    assert meta["train_files"] + meta["val_files"] == len(files)
    assert 0.12 < meta["val_files"] / len(files) < 0.28
    assert meta["train_bytes"] > meta["val_bytes"] > 0
