"""prepare --workers: the same bytes for any N, errors stop the pool, bounded chunks in flight."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from test_data_tokenizer import make_hf_tokenizer  # tests/unit is on sys.path (rootdir mode)
from test_prepare_formats import decoded, snapshot, write_input

from moetrain.data import prepare as prep
from moetrain.data.prepare import main, run

pytestmark = pytest.mark.timeout(60)


def mixed_inputs(root: Path) -> list[str]:
    """Every input kind, several hundred documents, so small chunks make many tasks."""
    docs = [f"doc {i}: " + "wörter " * (i % 13) for i in range(300)]
    root.mkdir()
    paths = [write_input(root, "txt", ["a whole text file\n"], name="a")]
    for j, kind in enumerate(["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf"]):
        paths.append(write_input(root, kind, docs[j * 60 : (j + 1) * 60], name=f"p{j}"))
    return paths


@pytest.mark.parametrize("tokenizer", ["byte", "hf"])
def test_workers_1_and_2_write_the_same_bytes(tmp_path: Path, tokenizer: str) -> None:
    inputs = mixed_inputs(tmp_path / "in")
    tok = make_hf_tokenizer(tmp_path / "tok.json") if tokenizer == "hf" else "byte"
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"out{workers}"
        report = run(inputs, str(outs[workers]), tok, workers=workers, chunk_bytes=512)
        assert report.workers == workers and report.meta["num_documents"] == 301
    assert snapshot(outs[1]) == snapshot(outs[2])  # tokens.bin and meta.json, bitwise
    if tokenizer == "byte":
        assert decoded(outs[1])[:2] == ["a whole text file\n", "doc 0: "]


def test_a_worker_error_stops_the_pool_and_leaves_the_output(tmp_path: Path, capsys) -> None:
    inputs = mixed_inputs(tmp_path / "in")
    lines = [b'{"text": "fine"}'] * 400 + [b'{"text": null}'] + [b'{"text": "x"}'] * 100
    bad = tmp_path / "in" / "z.jsonl"
    bad.write_bytes(b"\n".join(lines))
    out = tmp_path / "out"
    run(inputs[:1], str(out))
    before = snapshot(out)
    capsys.readouterr()
    argv = [*inputs, str(bad), "--output", str(out), "--force", "--workers", "2", "--chunk-mb"]
    assert main([*argv, "0.001"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}:401: 'text' holds a NoneType, not a string\n"
    assert snapshot(out) == before


@pytest.mark.parametrize("workers", [1, 2])
def test_the_first_error_in_input_order_wins(tmp_path: Path, workers: int, capsys) -> None:
    """A worker's error (bad JSON, first) beats a later reading error (truncated gzip)."""
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok"}\n' * 50 + b"{bad\n")
    gz = gzip.compress(b'{"text": "ok"}\n' * 5000)
    (tmp_path / "b.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    inputs = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz")]
    argv = [*inputs, "--output", str(tmp_path / "out"), "--workers", str(workers)]
    assert main([*argv, "--chunk-mb", "0.0001"]) == 2
    assert "a.jsonl:51: not valid JSON" in capsys.readouterr().err


def test_the_throughput_line(tmp_path: Path, capsys) -> None:
    inputs = mixed_inputs(tmp_path / "in")
    assert main([*inputs, "--output", str(tmp_path / "out"), "--workers", "2"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("throughput: ") and "MB/s of input" in last
    assert "M tokens/s" in last and "2 workers)" in last


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _InlinePool:
    """Runs each task at submission; counts what was submitted."""

    def __init__(self) -> None:
        self.submitted = 0

    def apply_async(self, fn, args):
        self.submitted += 1
        return _Done(args[0])


def test_at_most_limit_chunks_in_flight(monkeypatch) -> None:
    pool = _InlinePool()
    monkeypatch.setattr(prep, "_encode_in_worker", lambda chunk: chunk)
    read = []

    def chunks():
        for i in range(20):
            read.append(i)
            yield i

    for got, result in enumerate(prep._ordered(pool, chunks(), limit=3)):
        assert result == got  # in order
        assert len(read) - got <= 3  # never more than 3 chunks read and not yet consumed
    assert pool.submitted == 20


def test_workers_must_be_positive(tmp_path: Path, capsys) -> None:
    inputs = [write_input(tmp_path, "txt", ["x"])]
    assert main([*inputs, "--output", str(tmp_path / "out"), "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err


def test_a_worker_that_cannot_build_its_tokenizer_reports_it(tmp_path: Path) -> None:
    """Not an endless respawn of failing workers: the first task raises the cause."""
    prep._init_worker(str(tmp_path / "gone.json"))
    try:
        with pytest.raises(FileNotFoundError, match=r"gone\.json"):
            prep._encode_in_worker([])
    finally:
        prep._worker_tokenizer = None
