"""``data=mix`` end to end: a three-source mixture's realized shares and bit-exact resume over
200 steps, a Megatron-LM dataset built by megatron-core trained on directly (tokens equal to
megatron-core's reader), a changed mixture refused on resume, and bad sources as one line with
exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from moetrain.data.config import DataConfig, SourceConfig
from moetrain.data.corpus import load_stdlib_tokens
from moetrain.data.dataset import build_datasets
from moetrain.data.token_file import TokenDirWriter
from moetrain.data.tokenizer import ByteTokenizer
from moetrain.testing.layouts import small_run_command

WEIGHTS = (0.5, 0.3, 0.2)


def run(data_overrides: list[str], run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = small_run_command("unused", run_dir, "data.source=mix", "data.path=null", *data_overrides)
    # a constant lr: a run stopped at step 100 equals the first 100 steps of a 200-step run
    cmd += ["train.eval_interval=0", "checkpoint.final=false", "optim.schedule=constant", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows(run_dir) if "loss" in r]


def sources_override(paths: list[str], weights=WEIGHTS) -> str:
    entries = ", ".join(f"{{path: {p}, weight: {w}}}" for p, w in zip(paths, weights))
    return f"data.sources=[{entries}]"


@pytest.fixture(scope="module")
def three_dirs(tmp_path_factory) -> list[str]:
    """Three byte-token directories cut from the stdlib corpus (different text each)."""
    text = load_stdlib_tokens("train", ByteTokenizer(), 0.05)[: 3 * 60_000]
    root = tmp_path_factory.mktemp("mix")
    paths = []
    for i in range(3):
        path = root / f"part{i}"
        with TokenDirWriter(str(path), ByteTokenizer()) as writer:
            writer.write(np.append(text[i * 60_000 : (i + 1) * 60_000], 257), 1)
            writer.commit()
        paths.append(str(path))
    return paths


@pytest.mark.timeout(300)
def test_three_sources_200_steps_shares_and_resume_at_100(three_dirs, tmp_path):
    mix = [sources_override(three_dirs)]
    full = run(mix, tmp_path / "full", "train.steps=200")
    assert full.returncode == 0, full.stderr[-3000:]
    last = [r for r in rows(tmp_path / "full") if "loss" in r][-1]
    shares = [last[f"data_share/part{i}"] for i in range(3)]
    assert np.abs(np.array(shares) - WEIGHTS).max() < 0.01, shares
    assert last["data_wait_s"] >= 0 and last["data_epoch/part0"] > 0
    half = tmp_path / "half"
    first = run(mix, half, "train.steps=100", "checkpoint.final=true")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(mix, half, "train.steps=200")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    assert losses(half) == losses(tmp_path / "full")  # bit for bit, prefetching on
    # another mixture is refused on resume (one line, exit 2) unless allowed
    other = [sources_override(three_dirs, (0.2, 0.3, 0.5))]
    refused = run(other, half, "train.steps=210")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "data.allow_mixture_change=true" in refused.stderr
    allowed = run(other, half, "train.steps=202", "data.allow_mixture_change=true")
    assert allowed.returncode == 0, allowed.stderr[-3000:]


def megatron_dataset(prefix: Path) -> tuple[str, object]:
    """Byte-tokenized stdlib documents written by megatron-core's builder; its reader."""
    with warnings.catch_warnings():  # Megatron warns at import that Apex/TE are missing
        warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
        indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    tokens = load_stdlib_tokens("train", ByteTokenizer(), 0.05)[:200_000]
    docs = np.split(tokens, np.flatnonzero(tokens == 257) + 1)
    builder = indexed.IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for doc in docs:
        if len(doc):
            builder.add_item(torch.from_numpy(doc.astype(np.int64)))
            builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return str(prefix), indexed.IndexedDataset(str(prefix))


@pytest.mark.timeout(300)
def test_megatron_core_dataset_trains_and_reads_as_megatron_core(tmp_path):
    prefix, reader = megatron_dataset(tmp_path / "stdlib_text_document")
    run_dir = tmp_path / "run"
    proc = run([f"data.sources=[{{path: {prefix}, weight: 1.0}}]"], run_dir, "train.steps=30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(megatron)" in proc.stdout
    logged = [loss for _, loss in losses(run_dir)]
    assert np.mean(logged[-5:]) < np.mean(logged[:5]) - 0.5  # the loss falls
    # the windows of the run's 30 steps, replayed, equal megatron-core's reads
    cfg = DataConfig(source="mix", sources=[SourceConfig(path=prefix, weight=1.0)])
    train, _, _ = build_datasets(cfg, ByteTokenizer(), 32, 259)
    items = train.sampler(seed=0).take(30 * 4)
    inputs, _ = train.batch(items)
    starts = np.concatenate(([0], np.cumsum(reader.sequence_lengths)))
    for k, item in enumerate(items):
        begin = int(item) * 32
        i = int(np.searchsorted(starts, begin, side="right")) - 1
        parts, need = [], 32
        while need:
            offset = begin - int(starts[i])
            take = min(need, int(reader.sequence_lengths[i]) - offset)
            parts.append(reader.get(i, offset=offset, length=take))
            begin, need, i = begin + take, need - take, i + 1
        assert np.array_equal(inputs[k].numpy(), np.concatenate(parts))


@pytest.mark.timeout(120)
def test_bad_sources_fail_in_one_line(tmp_path):
    prefix, _ = megatron_dataset(tmp_path / "web")
    bad_bin = tmp_path / "short"
    (tmp_path / "short.idx").write_bytes(Path(prefix + ".idx").read_bytes())
    (tmp_path / "short.bin").write_bytes(Path(prefix + ".bin").read_bytes()[:100])
    cases = {
        f"data.sources=[{{path: {tmp_path / 'nothing'}, weight: 1.0}}]": "data.sources[0].path",
        f"data.sources=[{{path: {bad_bin}, weight: 1.0}}]": "short.bin",
        f"data.sources=[{{path: {prefix}, weight: 0.0}}]": "weights must sum to a positive",
        "data.sources=[]": "data.sources: is empty",
    }
    for override, expected in cases.items():
        proc = run([override], tmp_path / "run", "train.steps=2")
        assert proc.returncode == 2, (override, proc.stderr[-2000:])
        assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
        assert not (tmp_path / "run").exists()  # nothing left behind
