"""Weighted mixtures (``data.source=mix``): realized shares, exact resume, per-source splits
and checks, Megatron-LM sources read as megatron-core reads them, refusing a changed mixture."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from moetrain.data import BatchIterator
from moetrain.data.config import DataConfig, SourceConfig
from moetrain.data.dataset import build_datasets
from moetrain.data.mixture import MixtureSampler, blend
from moetrain.data.token_file import TokenDirWriter
from moetrain.data.tokenizer import ByteTokenizer

SEQ = 16
VOCAB = 259


def write_tokens(path: Path, num_docs: int, doc_len: int, base: int) -> str:
    """A prepared byte-token directory: ``num_docs`` documents of ``doc_len`` tokens whose ids
    start at ``base`` (so a token tells its source), each followed by eos."""
    tok = ByteTokenizer()
    with TokenDirWriter(str(path), tok) as writer:
        doc = (base + np.arange(doc_len) % 40).astype(np.int64)
        tokens = np.concatenate([np.append(doc, tok.eos_id)] * num_docs)
        writer.write(tokens, num_docs)
        writer.commit()
    return str(path)


def write_megatron(prefix: Path, docs: list[np.ndarray], dtype=np.uint16) -> str:
    with warnings.catch_warnings():  # Megatron warns at import that Apex/TE are missing
        warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
        indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    builder = indexed.IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


@pytest.fixture
def three_sources(tmp_path):
    """Three prepared directories of different sizes; source i's ids lie in [i*50, i*50+40)."""
    sizes = [(40, 30), (25, 20), (60, 10)]
    return [
        write_tokens(tmp_path / f"src{i}", n, length, 50 * i) for i, (n, length) in enumerate(sizes)
    ]


def mix_config(paths, weights, **kw) -> DataConfig:
    sources = [SourceConfig(path=p, weight=w) for p, w in zip(paths, weights)]
    return DataConfig(source="mix", sources=sources, **kw)


def build(cfg: DataConfig):
    return build_datasets(cfg, ByteTokenizer(), SEQ, VOCAB)


def source_of(inputs_BS: torch.Tensor) -> np.ndarray:
    """Which source each row came from (its first non-eos token's id range)."""
    first = [int(row[row != 257][0]) for row in inputs_BS]
    return np.array(first) // 50


def test_blend_stays_within_one_sample_of_the_weights():
    weights = np.array([0.5, 0.3, 0.2])
    counts = np.zeros(3)
    choice = blend(weights, counts, 0, 1000)
    for n in range(1, 1001):
        realized = np.bincount(choice[:n], minlength=3)
        assert np.all(np.abs(realized - weights * n) <= 1.0)


def test_three_sources_200_steps_shares_and_bit_exact_resume(three_sources):
    train, _, meta = build(mix_config(three_sources, [5, 3, 2]))  # normalized to .5/.3/.2
    assert [s["weight"] for s in meta["sources"]] == pytest.approx([0.5, 0.3, 0.2])
    batches = BatchIterator(train, train.sampler(seed=7), 4)
    steps = [batches.next_global_batch(8) for _ in range(200)]
    rows = torch.cat([x for step in steps for x, _ in step])
    shares = np.bincount(source_of(rows), minlength=3) / len(rows)
    assert np.abs(shares - [0.5, 0.3, 0.2]).max() < 0.01  # measured: < 1/1600
    progress = batches.sampler.progress()
    assert progress["shares"] == pytest.approx(dict(zip(["src0", "src1", "src2"], shares)))
    # resume at step 100 from a JSON round trip of the state: the same batches, bit for bit
    again = BatchIterator(train, train.sampler(seed=7), 4)
    for _ in range(100):
        again.next_global_batch(8)
    state = again.state_dict()
    resumed = BatchIterator(train, build(mix_config(three_sources, [5, 3, 2]))[0].sampler(7), 4)
    resumed.load_state_dict(state)
    for step in steps[100:]:
        for (x, y), (x2, y2) in zip(step, resumed.next_global_batch(8)):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_each_source_cycles_its_own_epochs(three_sources):
    train, _, _ = build(mix_config(three_sources, [1, 1, 1]))
    sampler = train.sampler(seed=0)
    per_source = [len(d) for d in train.datasets]
    n = 3 * max(per_source)
    items = sampler.take(n)
    source, local = train.locate(items)
    for i, size in enumerate(per_source):  # every window once per epoch of its source
        seen = local[source == i]
        full = len(seen) // size * size
        for e in range(len(seen) // size):
            assert sorted(seen[e * size : (e + 1) * size]) == list(range(size))
        assert full <= len(seen)
    epochs = sampler.progress()["epochs"]
    assert epochs["src0"] == pytest.approx(n / 3 / per_source[0])


def test_each_source_keeps_its_own_validation_split(three_sources, tmp_path):
    val_dir = write_tokens(tmp_path / "val1", 3, 20, 150)
    cfg = mix_config(three_sources, [1, 1, 1])
    cfg.sources[1].val_path = val_dir
    _, val, meta = build(cfg)
    src0 = meta["sources"][0]
    assert src0["val_tokens"] == -(-(src0["train_tokens"] + src0["val_tokens"]) // 20)  # 5 %
    assert meta["sources"][1]["val_tokens"] == 3 * 21  # its own val set, train keeps all
    assert meta["sources"][1]["train_tokens"] == 25 * 21
    batches = val.fixed_batches(3, 4)
    rows = torch.cat([x for x, _ in batches])
    assert set(source_of(rows)) == {0, 2, 3}  # the val path's ids start at 150
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, val.fixed_batches(3, 4)))


def test_a_changed_mixture_is_refused_unless_allowed(three_sources):
    train, _, _ = build(mix_config(three_sources, [5, 3, 2]))
    sampler = train.sampler(seed=0)
    sampler.take(50)
    state = sampler.state_dict()
    changed, _, _ = build(mix_config(three_sources, [1, 1, 1]))
    with pytest.raises(ValueError, match=r"data\.sources.*data\.allow_mixture_change=true"):
        changed.sampler(seed=0).load_state_dict(state)
    allowed = MixtureSampler(changed, seed=0, allow_change=True)
    allowed.load_state_dict(state)
    for old, new in zip(sampler.samplers, allowed.samplers):  # every source continues
        assert old.state_dict() == new.state_dict()
    assert allowed.drawn == 0  # blending restarts with the new weights
    with pytest.raises(ValueError, match=r"data\.source.*without data\.source=mix"):
        changed.sampler(seed=0).load_state_dict({"epoch": 0, "index": 3})


def test_megatron_source_windows_match_megatron_core_reader(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(0, 256, size=int(n)), 257) for n in rng.integers(5, 60, 30)]
    prefix = write_megatron(tmp_path / "web_text_document", docs)
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    reader = indexed.IndexedDataset(prefix)
    cfg = DataConfig(source="mix", sources=[SourceConfig(path=prefix, weight=1.0)])
    train, _, meta = build(cfg)
    assert meta["sources"][0]["format"] == "megatron"
    starts = np.concatenate(([0], np.cumsum(reader.sequence_lengths)))

    def megatron_tokens(begin: int, length: int) -> np.ndarray:
        """Stream tokens [begin, begin + length) through megatron-core's reader."""
        out = []
        i = int(np.searchsorted(starts, begin, side="right")) - 1
        while length > 0:
            offset = begin - int(starts[i])
            take = min(length, int(reader.sequence_lengths[i]) - offset)
            out.append(reader.get(i, offset=offset, length=take))
            begin, length, i = begin + take, length - take, i + 1
        return np.concatenate(out)

    items = train.sampler(seed=3).take(len(train))
    inputs, targets = train.batch(items)
    for k, item in enumerate(items):
        window = megatron_tokens(int(item) * SEQ, SEQ + 1)
        assert np.array_equal(inputs[k].numpy(), window[:-1])
        assert np.array_equal(targets[k].numpy(), window[1:])


def test_bad_sources_name_the_entry(three_sources, tmp_path):
    prefix = write_megatron(tmp_path / "big", [np.arange(600) % 300])
    with pytest.raises(ValueError, match=r"model\.vocab_size.*data\.sources\[1\]"):
        build(mix_config([three_sources[0], prefix], [1, 1]))
    with pytest.raises(FileNotFoundError, match=r"data\.sources\[0\]\.path.*prefix"):
        build(mix_config([prefix + ".idx"], [1]))
    (tmp_path / "lonely.bin").write_bytes(b"\0" * 8)
    with pytest.raises(FileNotFoundError, match=r"data\.sources\[0\]\.path.*lonely\.idx"):
        build(mix_config([str(tmp_path / "lonely")], [1]))
    with pytest.raises(ValueError, match=r"data\.sources: weights must sum to a positive"):
        mix_config(three_sources, [0, 0, 0])
    with pytest.raises(ValueError, match=r"data\.sources\[1\]\.weight"):
        mix_config(three_sources, [1, -1, 0])
    with pytest.raises(ValueError, match=r"data\.sources: is set but data\.source is 'tokens'"):
        DataConfig(source="tokens", path="x", sources=[SourceConfig(path="x")])
