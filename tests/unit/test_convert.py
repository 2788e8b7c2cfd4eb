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


def test_adaptive_aux_coefficients_are_training_state(tmp_path):
    """The adaptive coefficients (checkpointed training state) are not exported, and a model
    that has them starts them at their static values when its weights come from a checkpoint,
    a hub directory or Megatron tensors that lack them."""
    from moetrain.checkpoint.hf.hub import load_hf_weights, save_hf
    from moetrain.checkpoint.megatron_keys import state_from_megatron, state_to_megatron
    from moetrain.checkpoint.native import load_model_weights

    def adaptive() -> Transformer:
        model = tiny()
        cfg = model.cfg
        moe = MoEConfig(
            num_experts=4, top_k=2, dim=32, hidden_dim=24, adaptive_aux_smoothing=0.9,
            aux_loss_coeff_per_layer=[0.02, 0.05],
        )  # fmt: skip
        torch.manual_seed(1)
        return Transformer(type(cfg)(**{**cfg.__dict__, "moe": moe})).eval()

    def coeffs(model: Transformer) -> list[float]:
        return [float(layer.adaptive_aux.coeff) for layer in model.moe_layers()]

    plain = tiny()
    trained = adaptive()
    for layer in trained.moe_layers():  # as after some steps
        layer.adaptive_aux.coeff.fill_(0.5)
    save_hf(trained, tmp_path / "hf", "mixtral")  # exported without them
    save_model(plain, tmp_path / "native")
    for load_into in (
        lambda m: load_model_weights(tmp_path / "native", m),
        lambda m: load_hf_weights(tmp_path / "hf", m, m.cfg),
    ):
        model = adaptive()
        load_into(model)
        assert coeffs(model) == pytest.approx([0.02, 0.05])
    megatron = state_to_megatron(plain.cfg, plain.state_dict())
    ours = state_from_megatron(
        adaptive().cfg, lambda *names: next(megatron[n] for n in names if n in megatron)
    )
    got = [float(ours[f"layers.{i}.feed_forward.adaptive_aux.coeff"]) for i in (0, 1)]
    assert got == pytest.approx([0.02, 0.05])
    # a native checkpoint that has them restores them
    save_model(trained, tmp_path / "trained")
    model = adaptive()
    load_model_weights(tmp_path / "trained", model)
    assert coeffs(model) == [0.5, 0.5]
