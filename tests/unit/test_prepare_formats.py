"""prepare's input formats: each round-trips, directories find them, bad content is one line.

Every format is written here with its own library (json/gzip/zstandard, pyarrow, ``datasets``'s
``save_to_disk``) and read back through ``main()``; the decoded tokens must be the texts, each
followed by eos. Errors must exit 2 with one line naming the file and line/row, and leave the
output as it was.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moetrain.data.prepare import main, prepare
from moetrain.data.tokenizer import ByteTokenizer

pytestmark = pytest.mark.timeout(60)

DOCS = ["first document\n", "zweites Dokument: é ü 世界", "", 'fourth \\u and "quotes"']
KINDS = ["txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf"]


def _datasets():
    """The ``datasets`` module (skipping where it is missing), its progress bars off."""
    datasets = pytest.importorskip("datasets", reason="writes the save_to_disk directories")
    datasets.disable_progress_bars()
    return datasets


def _jsonl(docs: list[str], key: str = "text") -> bytes:
    lines = [json.dumps({key: d, "id": i}) for i, d in enumerate(docs)]
    return ("\n".join([*lines[:1], "", *lines[1:]]) + "\n").encode()  # a blank line is skipped


def write_input(directory: Path, kind: str, docs: list[str], name: str = "in") -> str:
    """``docs`` written as one input of ``kind`` in ``directory``; returns its path."""
    path = directory / (name if kind == "hf" else f"{name}.{kind}")
    if kind == "txt":
        assert len(docs) == 1, "a .txt file is one document"
        path.write_text(docs[0], encoding="utf-8")
    elif kind == "jsonl":
        path.write_bytes(_jsonl(docs))
    elif kind == "jsonl.gz":
        path.write_bytes(gzip.compress(_jsonl(docs)))
    elif kind == "jsonl.zst":
        zstandard = pytest.importorskip("zstandard")
        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl(docs)))
    elif kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        table = pa.table({"n": list(range(len(docs))), "text": docs})
        pq.write_table(table, path, row_group_size=max(1, len(docs) // 3))
    else:
        datasets = _datasets()
        dataset = datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))})
        dataset.save_to_disk(str(path), num_shards=min(3, len(docs)))
    return str(path)


def decoded(out: Path) -> list[str]:
    """The byte-tokenized documents of the prepared directory ``out``, eos checked."""
    meta = json.loads((out / "meta.json").read_text())
    tokens = np.fromfile(out / "tokens.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
    tok = ByteTokenizer()
    assert len(tokens) == meta["num_tokens"] and tokens[-1] == tok.eos_id
    docs = np.split(tokens, np.flatnonzero(tokens == tok.eos_id) + 1)[:-1]
    assert len(docs) == meta["num_documents"]
    return [bytes(d[:-1].astype(np.uint8)).decode() for d in docs]


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` with its bytes (None if ``path`` does not exist)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", KINDS)
def test_each_format_round_trips(tmp_path: Path, kind: str, capsys) -> None:
    docs = DOCS[:1] if kind == "txt" else DOCS
    out = tmp_path / "out"
    assert main([write_input(tmp_path, kind, docs), "--output", str(out)]) == 0
    assert decoded(out) == docs
    printed = capsys.readouterr().out
    assert f"{len(docs)} documents" in printed and "MB/s" in printed and "tokens/s" in printed


def test_directory_finds_new_suffixes_and_datasets_dirs(tmp_path: Path) -> None:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    write_input(root, "jsonl.gz", ["a"], name="a")
    write_input(root / "sub", "parquet", ["c1", "c2"], name="c")
    write_input(root, "hf", ["b1", "b2"], name="b_hf")  # its .arrow shards are not inputs
    write_input(root, "jsonl.zst", ["d"], name="d")
    (root / "e.md").write_text("skipped")
    prepare([str(root)], str(tmp_path / "out"))
    assert decoded(tmp_path / "out") == ["a", "b1", "b2", "d", "c1", "c2"]  # sorted paths


def test_datasets_dir_given_directly_and_large_shards(tmp_path: Path) -> None:
    docs = [f"row {i} " * (i % 7) for i in range(50)]
    path = write_input(tmp_path, "hf", docs)
    prepare([path], str(tmp_path / "out"), chunk_bytes=64)
    assert decoded(tmp_path / "out") == docs


def test_multi_frame_zst_and_multi_member_gz(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    halves = [_jsonl(DOCS[:2]), _jsonl(DOCS[2:])]
    zst, gz = tmp_path / "m.jsonl.zst", tmp_path / "m.jsonl.gz"
    zst.write_bytes(b"".join(zstandard.ZstdCompressor().compress(h) for h in halves))
    gz.write_bytes(b"".join(gzip.compress(h) for h in halves))
    prepare([str(zst), str(gz)], str(tmp_path / "out"), chunk_bytes=8)
    assert decoded(tmp_path / "out") == DOCS + DOCS


def test_dataset_dict_asks_for_one_split(tmp_path: Path, capsys) -> None:
    datasets = _datasets()
    splits = {s: datasets.Dataset.from_dict({"text": [s]}) for s in ("train", "test")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    assert main([str(tmp_path / "dd"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "DatasetDict (splits: test, train)" in err and str(tmp_path / "dd" / "test") in err


def _truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def _big_jsonl(n: int = 2000) -> bytes:
    return _jsonl([f"document number {i} " * 5 for i in range(n)])


def _bad_jsonl(tmp_path: Path, lines: list[bytes]) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _bad_parquet(tmp_path: Path, columns: dict) -> str:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return str(path)


def _bad_hf(tmp_path: Path, columns: dict) -> str:
    datasets = _datasets()
    path = tmp_path / "bad_hf"
    datasets.Dataset.from_dict(columns).save_to_disk(str(path), num_shards=2)
    return str(path)


def _garbage_hf(tmp_path: Path) -> str:
    path = _bad_hf(tmp_path, {"text": ["a", "b", "c", "d"]})
    (Path(path) / "data-00001-of-00002.arrow").write_bytes(b"garbage" * 10)
    return path


def _bad_zst(tmp_path: Path) -> str:
    zstandard = pytest.importorskip("zstandard")
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(_truncated(zstandard.ZstdCompressor().compress(_big_jsonl())))
    return str(path)


def _bad_gz(tmp_path: Path) -> str:
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(_truncated(gzip.compress(_big_jsonl())))
    return str(path)


def _bad_txt(tmp_path: Path) -> str:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok \xff\xfe not utf-8")
    return str(path)


def _garbage_parquet(tmp_path: Path) -> str:
    pytest.importorskip("pyarrow")
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file at all")
    return str(path)


# (writer of the bad input, fragments the one-line message must hold)
BAD_INPUTS = {
    "json": (lambda p: _bad_jsonl(p, [b'{"text": "a"}', b"", b"{oops"]), ["bad.jsonl:3:", "JSON"]),
    "key": (lambda p: _bad_jsonl(p, [b'{"body": "a"}']), ["bad.jsonl:1:", "--text-key"]),
    "not-str": (lambda p: _bad_jsonl(p, [b'{"text": 7}']), ["bad.jsonl:1:", "not a string"]),
    "utf8": (lambda p: _bad_jsonl(p, [b'{"text": "a"}', b'{"text": "\xff"}']), ["bad.jsonl:2:"]),
    "surrogate": (lambda p: _bad_jsonl(p, [b'{"text": "\\ud800"}']), ["bad.jsonl:1:", "surro"]),
    "gz": (_bad_gz, ["bad.jsonl.gz", "truncated gzip", "after line"]),
    "zst": (_bad_zst, ["bad.jsonl.zst", "truncated zstd", "after line"]),
    "txt": (_bad_txt, ["bad.txt", "UTF-8"]),
    "pq-column": (
        lambda p: _bad_parquet(p, {"body": ["a"], "n": [1]}),
        ["bad.parquet", "no column 'text' (columns: body, n)"],
    ),
    "pq-null": (
        lambda p: _bad_parquet(p, {"text": ["a", "b", "c", None, "e"]}),
        ["bad.parquet", "row 3", "null"],
    ),
    "pq-type": (lambda p: _bad_parquet(p, {"text": [1, 2]}), ["bad.parquet", "int64"]),
    "pq-garbage": (_garbage_parquet, ["bad.parquet", "not a readable parquet"]),
    "hf-column": (
        lambda p: _bad_hf(p, {"body": ["a", "b"]}),
        ["bad_hf", "no column 'text' (columns: body)"],
    ),
    "hf-null": (
        lambda p: _bad_hf(p, {"text": ["a", "b", "c", None]}),
        ["data-00001-of-00002.arrow", "row 3", "null"],
    ),
    "hf-garbage": (_garbage_hf, ["data-00001-of-00002.arrow", "not an Arrow IPC stream"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_output_untouched(tmp_path: Path, case: str, capsys) -> None:
    write_bad, fragments = BAD_INPUTS[case]
    bad = write_bad(tmp_path)
    fresh, existing = tmp_path / "fresh" / "out", tmp_path / "existing"
    prepare([write_input(tmp_path, "jsonl", ["old"], name="old")], str(existing))
    before = snapshot(existing)
    capsys.readouterr()
    for out in (fresh, existing):
        assert main([bad, "--output", str(out), "--force"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        for fragment in fragments:
            assert fragment in err, (fragment, err)
    assert not (tmp_path / "fresh").exists()  # the directories prepare made are gone again
    assert snapshot(existing) == before  # no temp file left, old tokens/meta intact


def test_missing_pyarrow_is_one_line_with_the_install(tmp_path: Path, monkeypatch, capsys) -> None:
    path = write_input(tmp_path, "parquet", ["a"])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert main([path, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "in.parquet" in err and "pip install pyarrow" in err and err.count("\n") == 1


def test_missing_zstandard_is_one_line_with_the_install(tmp_path: Path, monkeypatch, capsys):
    path = write_input(tmp_path, "jsonl.zst", ["a"])
    monkeypatch.setitem(sys.modules, "zstandard", None)
    assert main([path, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "in.jsonl.zst" in err and "pip install zstandard" in err and err.count("\n") == 1


def test_prepare_imports_without_pyarrow_or_zstandard() -> None:
    code = (
        "import sys; sys.modules['pyarrow'] = None; sys.modules['zstandard'] = None\n"
        "import moetrain.data.prepare, moetrain.data.readers\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
