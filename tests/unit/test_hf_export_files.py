"""What a Hugging Face export writes besides the weights: file modes that follow the umask, and
the run's tokenizer (a ``tokenizer.json`` run exports it, a byte-tokenizer run exports none)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moetrain.checkpoint import convert
from moetrain.checkpoint.checksums import CHECKSUMS, checksums
from moetrain.checkpoint.native import save_model
from moetrain.data.tokenizer import HFTokenizer
from moetrain.models import ModelConfig, Transformer
from moetrain.moe.config import MoEConfig

TEXT = "the quick brown fox jumps over the lazy dög"


def make_tokenizer(path: Path) -> Path:
    """A tiny byte-level BPE (no download) with an end-of-text token, saved as JSON."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 10, trainer)
    tok.save(str(path))
    return path


def run_checkpoint(root: Path, tokenizer: str) -> Path:
    """A native checkpoint as a run on ``data.tokenizer=tokenizer`` saves it: the run's config
    (model and data) in ``train_state.json``, covered by the checksums."""
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, dim=32, hidden_dim=24)
    cfg = ModelConfig(
        vocab_size=320, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, dense_hidden_dim=40,
        max_seq_len=32, first_k_dense=1, moe=moe,
    )  # fmt: skip
    step = save_model(Transformer(cfg).eval(), root / "run" / "checkpoints" / "00000002")
    state = json.loads((step / "train_state.json").read_text())
    state["config"]["data"] = {"source": "tokens", "path": "tok/", "tokenizer": tokenizer}
    (step / "train_state.json").write_text(json.dumps(state))
    (step / CHECKSUMS).write_text(json.dumps(checksums(step)))
    return root / "run"


def export(src: Path, dst: Path, *extra: str) -> int:
    return convert.main(
        ["--from", str(src), "--to", str(dst), "--format", "hf", "--arch", "qwen2_moe", *extra]
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_have_the_umask_modes(tmp_path, umask):
    run = run_checkpoint(tmp_path, str(make_tokenizer(tmp_path / "tokenizer.json")))
    os.chmod(tmp_path / "tokenizer.json", 0o600)  # the copy does not take the source's mode
    old = os.umask(umask)
    try:
        assert export(run, tmp_path / "out", "--max-shard-size", "0.0001") == 0
    finally:
        os.umask(old)
    files = sorted((tmp_path / "out").iterdir())
    assert any(f.name.endswith(".safetensors") for f in files)
    assert {f.name: mode(f) for f in files} == {f.name: 0o666 & ~umask for f in files}
    assert mode(tmp_path / "out") == 0o777 & ~umask


def test_export_carries_the_runs_tokenizer(tmp_path, capsys):
    tok_path = make_tokenizer(tmp_path / "my_tokenizer.json")
    run = run_checkpoint(tmp_path, str(tok_path))
    assert export(run, tmp_path / "out", "--verify") == 0
    assert "tokenizer tokenizer.json, tokenizer_config.json" in capsys.readouterr().out
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    import transformers

    theirs = transformers.AutoTokenizer.from_pretrained(out)
    ours = HFTokenizer(str(tok_path))
    assert theirs(TEXT, add_special_tokens=False)["input_ids"] == ours.encode(TEXT)
    assert theirs.eos_token_id == ours.eos_id
    # hub -> hub keeps them
    assert export(out, tmp_path / "again") == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()


def test_relative_tokenizer_path_is_read_from_the_current_directory(tmp_path, monkeypatch):
    make_tokenizer(tmp_path / "tokenizer.json")
    run = run_checkpoint(tmp_path, "tokenizer.json")
    monkeypatch.chdir(tmp_path)
    assert export(run, tmp_path / "out") == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_byte_tokenizer_run_exports_no_tokenizer(tmp_path):
    run = run_checkpoint(tmp_path, "byte")
    assert export(run, tmp_path / "out") == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"config.json", "model.safetensors"}


def test_missing_tokenizer_file_warns_and_exports_the_weights(tmp_path, capsys):
    run = run_checkpoint(tmp_path, str(tmp_path / "gone.json"))
    assert export(run, tmp_path / "out") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moetrain-convert: warning: no tokenizer")
    assert "gone.json" in err[0]
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()
