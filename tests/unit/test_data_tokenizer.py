"""Byte and Hugging Face tokenizers: round trips, specials, end-of-text handling, errors."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moetrain.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

TEXT = "héllo wörld, 世界 🙂\n\tdef f(x): return x"


def make_hf_tokenizer(path, specials=("<eos>",)):
    """A tiny byte-level BPE trained on a few sentences (no download) saved as tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    tok.save(str(path))
    return str(path)


def test_byte_round_trip_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert max(ids) < 256
    assert tok.decode(ids) == TEXT
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)


def test_byte_decode_skips_specials_and_replaces_bad_bytes():
    tok = ByteTokenizer()
    assert tok.decode([256, *tok.encode("ab"), 257, 258]) == "ab"
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([259])


def test_byte_encode_documents_appends_eos():
    tok = ByteTokenizer()
    out = tok.encode_documents(["ab", "", "é"])
    assert out.dtype == np.uint16
    assert out.tolist() == [97, 98, 257, 257, *"é".encode(), 257]


def test_hf_tokenizer_from_file(tmp_path):
    path = make_hf_tokenizer(tmp_path / "tokenizer.json")
    tok = build_tokenizer(path)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == Tokenizer.from_file(path).get_vocab_size() > 256
    assert tok.eos_id == 0
    ids = tok.encode(TEXT)
    assert tok.eos_id not in ids
    assert tok.decode(ids) == TEXT
    assert tok.decode([*ids, tok.eos_id]) == TEXT  # specials skipped
    docs = tok.encode_documents(["the fox", "dog"])
    assert docs.dtype == np.uint16
    assert docs.tolist() == [*tok.encode("the fox"), 0, *tok.encode("dog"), 0]


def test_hf_tokenizer_without_eos(tmp_path):
    tok = HFTokenizer(make_hf_tokenizer(tmp_path / "t.json", specials=("<unk>",)))
    assert tok.eos_id is None
    with pytest.raises(ValueError, match=r"data\.tokenizer.*end-of-text"):
        tok.encode_documents(["x"])


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer.*'nope'"):
        build_tokenizer("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"data\.tokenizer.*not a valid"):
        build_tokenizer(str(bad))
