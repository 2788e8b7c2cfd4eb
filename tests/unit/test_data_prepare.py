"""The prepare CLI: txt/jsonl inputs, meta.json, atomic output, clear errors."""

import json

import numpy as np
import pytest
from test_data_tokenizer import make_hf_tokenizer  # tests/unit is on sys.path (rootdir mode)

from moetrain.data.prepare import main, prepare
from moetrain.data.tokenizer import ByteTokenizer, build_tokenizer

DOCS = ["first document\n", "zweites Dokument: é ü 世界", "third"]


def write_inputs(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text(DOCS[0], encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    lines = [json.dumps({"text": DOCS[1], "id": 1}), "", json.dumps({"text": DOCS[2]})]
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [str(txt), str(jsonl)]


def read_tokens(out, meta):
    return np.fromfile(out / "tokens.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<"))


def test_main_txt_and_jsonl(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*write_inputs(tmp_path), "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    tok = ByteTokenizer()
    expected = [t for d in DOCS for t in [*tok.encode(d), tok.eos_id]]
    assert meta == {
        "format": 1,
        "dtype": "uint16",
        "num_tokens": len(expected),
        "num_documents": 3,
        "vocab_size": 259,
        "tokenizer": "byte",
        "eos_id": 257,
    }
    tokens = read_tokens(out, meta)
    assert tokens.tolist() == expected
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokens.bin"]  # no temp files


def test_hf_tokenizer_and_text_key(tmp_path):
    tok_path = make_hf_tokenizer(tmp_path / "tokenizer.json")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d}) for d in DOCS), encoding="utf-8")
    out = tmp_path / "out"
    meta = prepare([str(jsonl)], str(out), tokenizer=tok_path, text_key="body")
    tok = build_tokenizer(tok_path)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eos_id"]) == (tok_path, tok.vocab_size, 0)
    tokens = read_tokens(out, meta)
    docs = np.split(tokens, np.flatnonzero(tokens == tok.eos_id) + 1)[:-1]
    assert [tok.decode(d.tolist()) for d in docs] == DOCS


def test_directory_input(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "b.txt").write_text("b")
    (tmp_path / "in" / "sub" / "a.txt").write_text("a")
    (tmp_path / "in" / "skip.md").write_text("skip")
    meta = prepare([str(tmp_path / "in")], str(tmp_path / "out"))
    assert read_tokens(tmp_path / "out", meta).tolist() == [98, 257, 97, 257]


def test_missing_input(tmp_path, capsys):
    assert main([str(tmp_path / "nope.txt"), "--output", str(tmp_path / "o")]) == 2
    assert "nope.txt" in capsys.readouterr().err


def test_jsonl_missing_key_names_file_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: no key 'text'.*--text-key"):
        prepare([str(bad)], str(out))
    assert not out.exists()  # prepare created it, so a failure removes it with its temp file


def test_jsonl_invalid_json(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        prepare([str(bad)], str(tmp_path / "out"))


def test_output_not_empty_needs_force(tmp_path):
    inputs = write_inputs(tmp_path)
    out = tmp_path / "out"
    prepare(inputs[:1], str(out))
    with pytest.raises(ValueError, match="--force"):
        prepare(inputs, str(out))
    meta = prepare(inputs, str(out), force=True)
    assert meta["num_documents"] == 3
    assert json.loads((out / "meta.json").read_text()) == meta


def test_unknown_suffix(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match=r"\.txt.*\.jsonl"):
        prepare([str(tmp_path / "a.csv")], str(tmp_path / "out"))
