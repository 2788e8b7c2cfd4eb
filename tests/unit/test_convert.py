"""moetrain-convert and moetrain.load_model across native and Hugging Face directories."""

from __future__ import annotations

import pytest
import torch

import moetrain
from moetrain.checkpoint import CheckpointError, convert
from moetrain.checkpoint.native import load, save_model
from moetrain.models import ModelConfig, Transformer
from moetrain.moe.config import MoEConfig


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, dim=32, hidden_dim=24)
    cfg = ModelConfig(
        vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, dense_hidden_dim=40,
        max_seq_len=32, first_k_dense=0, moe=moe, **kw,
    )  # fmt: skip
    return Transformer(cfg).eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name, tensor in sa.items():
        assert torch.equal(sb[name], tensor), name


def test_native_to_hf_to_native_with_verify(tmp_path, capsys):
    model = tiny()
    save_model(model, tmp_path / "native")
    assert convert.main(
        ["--from", str(tmp_path / "native"), "--to", str(tmp_path / "hf"), "--format", "hf",
         "--verify"]
    ) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "mixtral" in out and "verify: transformers" in out and "verify: ok" in out
    assert convert.main(
        ["--from", str(tmp_path / "hf"), "--to", str(tmp_path / "back"), "--format", "native",
         "--verify"]
    ) == 0  # fmt: skip
    same_weights(moetrain.load_model(tmp_path / "back"), model)
    same_weights(moetrain.load_model(tmp_path / "hf"), model)


def test_weights_only_checkpoint_cannot_be_resumed(tmp_path):
    model = tiny()
    save_model(model, tmp_path / "native")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match=r"checkpoint\.init_from"):
        load(tmp_path / "native", model, optimizer, same_layout=True)


def test_unexpressible_arch_is_one_line_and_writes_nothing(tmp_path, capsys):
    save_model(tiny(), tmp_path / "native")
    code = convert.main(
        ["--from", str(tmp_path / "native"), "--to", str(tmp_path / "hf"), "--format", "hf",
         "--arch", "olmoe"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("moetrain-convert: error: cannot export to olmoe: model.qk_norm=none")
    assert err.count("\n") == 1
    assert not (tmp_path / "hf").exists()


def test_destination_must_be_new(tmp_path, capsys):
    save_model(tiny(), tmp_path / "native")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    code = convert.main(
        ["--from", str(tmp_path / "native"), "--to", str(tmp_path / "hf"), "--format", "hf"]
    )
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


def test_a_verification_mismatch_removes_the_output(tmp_path, monkeypatch, capsys):
    model = tiny()
    save_model(model, tmp_path / "native")
    real_load = convert.load_model

    def load_then_perturb(path, *setting):
        loaded = real_load(path, *setting)
        if path == tmp_path / "out":  # the reload of what was written: one weight off by 1e-3
            with torch.no_grad():
                loaded.output.weight[0, 0] += 1e-3
        return loaded

    monkeypatch.setattr(convert, "load_model", load_then_perturb)
    code = convert.main(
        ["--from", str(tmp_path / "native"), "--to", str(tmp_path / "out"), "--format", "native",
         "--verify"]
    )  # fmt: skip
    assert code == 1
    assert "verification failed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
