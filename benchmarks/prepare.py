"""Throughput of ``moetrain.data.prepare`` beside its ceiling, the tokenizer alone.

A synthetic ``.jsonl`` corpus (random words with a Zipf law, some non-ASCII, documents of 50 to
2,000 words; seeded) is written to a temporary directory and a byte-level BPE ``tokenizer.json``
is trained on its first megabytes with the ``tokenizers`` library (no download). For the byte
tokenizer and that BPE, prepare runs with each ``--workers`` count, and the ceiling runs alone on
the same texts, already in memory, in prepare's 4 MB batches: ``tokenizers``'
``Tokenizer.encode_batch`` (all cores) for the BPE (and ``encode_batch_fast``, which prepare
calls, as a second row), ``ByteTokenizer.encode_documents`` for bytes. MB/s always counts the
``.jsonl`` file's bytes, so the ratios compare like with like.

The fork server of ``--workers`` > 1 is started once per process (it imports moetrain.data and
torch): it is timed apart, before the rows, and not counted in them. Outputs of every workers
count are compared byte for byte with ``--workers 1``. Each figure is the best of ``repeats``
runs (the machine may be shared).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moetrain.data.prepare import run as run_prepare
from moetrain.data.tokenizer import ByteTokenizer

EOS = "<|endoftext|>"
_SPECIAL_WORDS = ["über", "naïve", "東京", "Straße", "café", "日本語", "ελληνικά", "—"]


@dataclass
class Row:
    tokenizer: str
    runner: str
    seconds: float
    mb_per_s: float
    tokens_per_s: float
    ratio: float = float("nan")  # MB/s over the ceiling's MB/s


def make_corpus(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write a ~``size_mb`` MB ``.jsonl`` corpus at ``path``; return its byte size."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(2, 11))) for _ in range(20_000)]
    vocab[: len(_SPECIAL_WORDS)] = _SPECIAL_WORDS
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    words = rng.choice(len(vocab), size=int(size_mb * 1e6 / 6.5), p=weights / weights.sum())
    target, written, start = size_mb * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target and start < len(words):
            n = int(rng.integers(50, 2001))
            text = " ".join(vocab[i] for i in words[start : start + n]) + ".\n"
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            start += n
    return path.stat().st_size


def read_texts(path: Path) -> list[str]:
    """The corpus's texts, in memory (for the ceiling only)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def train_bpe(texts: list[str], path: Path, vocab_size: int, sample_mb: float) -> str:
    """A byte-level BPE trained on the first ``sample_mb`` MB of ``texts``, saved at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sample, size = [], 0
    for text in texts:
        if size >= sample_mb * 1e6:
            break
        sample.append(text)
        size += len(text)
    tok.train_from_iterator(sample, trainer)
    tok.save(str(path))
    return str(path)


def _batches(texts: list[str], batch_chars: int) -> list[list[str]]:
    """``texts`` cut into consecutive batches of about ``batch_chars`` (prepare's chunks)."""
    out: list[list[str]] = [[]]
    size = 0
    for text in texts:
        out[-1].append(text)
        size += len(text)
        if size >= batch_chars:
            out.append([])
            size = 0
    return [b for b in out if b]


def time_ceiling(texts: list[str], tokenizer: str, method: str, batch_chars: int) -> tuple:
    """(seconds, tokens incl. one eos per document) of tokenizing ``texts`` alone."""
    if tokenizer == "byte":
        tok = ByteTokenizer()
        start = time.perf_counter()
        tokens = sum(len(tok.encode_documents(b)) for b in _batches(texts, batch_chars))
        return time.perf_counter() - start, tokens
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(tokenizer)
    encode = getattr(hf, method)
    start = time.perf_counter()
    tokens = 0
    for batch in _batches(texts, batch_chars):
        tokens += sum(len(e.ids) for e in encode(batch, add_special_tokens=False)) + len(batch)
    return time.perf_counter() - start, tokens


def _digest(directory: Path) -> str:
    """sha256 over ``tokens.bin`` and ``meta.json``."""
    h = hashlib.sha256()
    for name in ("tokens.bin", "meta.json"):
        h.update((directory / name).read_bytes())
    return h.hexdigest()


def start_fork_server(workdir: Path) -> float:
    """Seconds of a first ``--workers 2`` run on a tiny input: the one-off fork-server start."""
    tiny = workdir / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "warm up"}) + "\n")
    return run_prepare([str(tiny)], str(workdir / "tiny_out"), workers=2).seconds


def _row(tokenizer: str, runner: str, seconds: float, tokens: int, size: int) -> Row:
    return Row(tokenizer, runner, seconds, size / 1e6 / seconds, tokens / seconds)


def _ceiling_rows(texts: list[str], name: str, tokenizer: str, size: int, repeats: int) -> list:
    """The tokenizer alone, best of ``repeats``: ``ByteTokenizer``, or tokenizers' two batches."""
    methods = ["encode_documents"] if name == "byte" else ["encode_batch", "encode_batch_fast"]
    rows = []
    for method in methods:
        seconds, tokens = min(
            time_ceiling(texts, tokenizer, method, 4 << 20) for _ in range(repeats)
        )
        label = f"ceiling: {method}" if name == "byte" else f"ceiling: tokenizers {method}"
        rows.append(_row(name, label, seconds, tokens, size))
    return rows


def _prepare_rows(
    corpus: Path,
    size: int,
    name: str,
    tokenizer: str,
    workers: list[int],
    workdir: Path,
    repeats: int,
) -> tuple[list[Row], dict[int, bool]]:
    """One row per workers count (best of ``repeats``); whether each output equals N=1's."""
    rows, digests = [], {}
    for n in workers:
        out = workdir / f"out_{name}_{n}"
        reports = [
            run_prepare([str(corpus)], str(out), tokenizer, force=True, workers=n)
            for _ in range(repeats)
        ]
        best = min(reports, key=lambda r: r.seconds)
        rows.append(
            _row(name, f"prepare --workers {n}", best.seconds, best.meta["num_tokens"], size)
        )
        digests[n] = _digest(out)
    return rows, {n: digests[n] == digests[workers[0]] for n in workers}


def run(
    size_mb: float, workers: list[int], vocab_size: int = 8192, seed: int = 0, repeats: int = 3
) -> dict:
    """The benchmark: rows per tokenizer, the fork-server start, identity of the outputs."""
    workers = sorted({1, 2, *workers})
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        workdir = Path(tmp)
        corpus = workdir / "corpus.jsonl"
        size = make_corpus(corpus, size_mb, seed)
        texts = read_texts(corpus)
        start = time.perf_counter()
        bpe = train_bpe(texts, workdir / "tokenizer.json", vocab_size, sample_mb=min(size_mb, 4))
        train_s = time.perf_counter() - start
        server_s = start_fork_server(workdir)
        rows: list[Row] = []
        identical: dict[str, dict[int, bool]] = {}
        for name, tokenizer in (("byte", "byte"), ("bpe", bpe)):
            ceiling = _ceiling_rows(texts, name, tokenizer, size, repeats)
            prepared, identical[name] = _prepare_rows(
                corpus, size, name, tokenizer, workers, workdir, repeats
            )
            for row in ceiling + prepared:
                row.ratio = row.mb_per_s / ceiling[0].mb_per_s
            rows += ceiling + prepared
    return {
        "corpus_mb": size / 1e6,
        "documents": len(texts),
        "cpus": os.cpu_count(),
        "bpe_vocab": vocab_size,
        "bpe_train_s": train_s,
        "fork_server_s": server_s,
        "repeats": repeats,
        "rows": [asdict(r) for r in rows],
        "identical": identical,
    }


def format_table(result: dict[str, Any]) -> str:
    """``run``'s result as a table."""
    lines = [
        f"corpus: {result['corpus_mb']:.1f} MB jsonl, {result['documents']:,} documents; "
        f"{result['cpus']} CPUs; BPE vocab {result['bpe_vocab']} trained in "
        f"{result['bpe_train_s']:.1f} s",
        f"fork-server start (once per process with --workers > 1, not in the rows): "
        f"{result['fork_server_s']:.2f} s",
        f"{'tokenizer':9} {'runner':37} {'seconds':>8} {'MB/s':>8} {'M tok/s':>8} {'ratio':>6}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['tokenizer']:9} {r['runner']:37} {r['seconds']:8.2f} {r['mb_per_s']:8.1f} "
            f"{r['tokens_per_s'] / 1e6:8.2f} {r['ratio']:6.2f}"
        )
    lines.append(
        f"best of {result['repeats']}; ratio = MB/s over the tokenizer's first ceiling row; "
        "MB = the .jsonl file's"
    )
    for name, same in result["identical"].items():
        verdict = ", ".join(f"{n}: {'identical' if ok else 'DIFFERENT'}" for n, ok in same.items())
        lines.append(f"{name}: output vs --workers 1 -> {verdict}")
    return "\n".join(lines)
