"""Upcycling dense models built with ``transformers`` (tiny, random): the exact modes give the
dense logits, in moetrain and in ``transformers`` after an HF export; partition reports its gap;
bad requests fail with one line."""

from __future__ import annotations

import json

import pytest
import torch

import moetrain
from moetrain.checkpoint import upcycle as up
from moetrain.checkpoint.hf import load_hf

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    rms_norm_eps=1e-6,
)  # fmt: skip


def dense_hf(arch: str, path, **kw):
    config = transformers.AutoConfig.for_model(arch, **{**COMMON, **kw})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.float().save_pretrained(path)
    return model.eval()


def tokens():
    return torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))


def logits_of(model, x):
    with torch.no_grad():
        out = model(input_ids=x) if hasattr(model, "config") else model(x)
    return out.logits if hasattr(out, "logits") else out


def upcycle_cli(src, dst, *args) -> int:
    return up.main(["--from", str(src), "--to", str(dst), *args])


@pytest.mark.parametrize(
    ("arch", "mode", "args", "hf_type"),
    [
        ("llama", "copy", ["--num-experts", "8", "--top-k", "2"], "mixtral"),
        (
            "qwen3",
            "granular",
            [
                "--num-experts",
                "8",
                "--top-k",
                "4",
                "--granularity",
                "2",
                "--router-init",
                "normal",
                "--router-std",
                "0.5",
            ],
            "qwen3_moe",
        ),
        (
            "llama",
            "shared",
            ["--num-experts", "4", "--top-k", "2", "--router-init", "normal"],
            "qwen2_moe",
        ),
        ("qwen2", "copy", ["--num-experts", "4", "--top-k", "2"], "qwen2_moe"),
        (
            "mistral",
            "granular",
            ["--num-experts", "4", "--top-k", "2", "--granularity", "2"],
            "mixtral",
        ),
    ],
)
def test_exact_modes_keep_the_dense_logits_in_transformers(arch, mode, args, hf_type, tmp_path):
    extra = {"sliding_window": 7} if arch == "mistral" else {}
    dense = dense_hf(arch, tmp_path / "dense", **extra)
    code = upcycle_cli(tmp_path / "dense", tmp_path / "moe", "--mode", mode, *args,
                       "--format", "hf")  # fmt: skip
    assert code == 0
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == hf_type
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "moe", attn_implementation="eager"
    ).eval()
    x = tokens()
    want = logits_of(dense, x)
    torch.testing.assert_close(logits_of(theirs, x), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(moetrain.load_model(tmp_path / "moe")(x), want, atol=1e-4, rtol=1e-4)
    rep = json.loads((tmp_path / "moe" / "upcycle_report.json").read_text())
    assert rep["exact_mode"] and rep["preservation"]["max_abs"] < 1e-4
    assert len(rep["preservation"]["layers"]) == 2
    # the printed training command's model config accepts the export as checkpoint.init_from
    from omegaconf import OmegaConf

    from moetrain.checkpoint.hf import load_hf_weights
    from moetrain.models import Transformer
    from moetrain.train.cli import compose_config

    composed = compose_config([f"hydra.searchpath=[file://{tmp_path / 'moe'}]", "model=upcycled"])
    run_cfg = OmegaConf.to_object(composed).model
    model = Transformer(run_cfg)
    load_hf_weights(tmp_path / "moe", model, run_cfg)
    torch.testing.assert_close(model.eval()(x), want, atol=1e-4, rtol=1e-4)


def test_native_output_trains_from_the_printed_command_config(tmp_path, capsys):
    dense_hf("qwen3", tmp_path / "dense")
    assert upcycle_cli(tmp_path / "dense", tmp_path / "moe", "--mode", "shared",
                       "--num-experts", "4", "--top-k", "2") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "model=upcycled checkpoint.init_from=" in out
    from moetrain.train.cli import compose_config

    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path / 'moe'}]", "model=upcycled"])
    model = moetrain.load_model(tmp_path / "moe")
    assert cfg.model.moe.num_shared_experts == 1 and not cfg.model.moe.shared_gate
    assert cfg.model.moe.num_experts == 4 and cfg.model.dim == model.cfg.dim
    assert cfg.model.qk_norm == "head"


def test_partition_reports_its_gap_and_all_active_is_exact(tmp_path):
    dense = load_hf_dense(tmp_path)
    for method in ("random", "cluster"):
        spec = up.UpcycleSpec(mode="partition", num_experts=4, top_k=2, partition_method=method)
        moe = up.upcycle(dense, spec)
        rep = up.report(dense, moe, spec)
        assert not rep["exact_mode"]
        assert rep["preservation"]["logits"]["rel"] > 1e-3  # top-2 of 4 parts: an estimate
        assert rep["all_experts_active"]["max_abs"] < 1e-4  # all parts, scaled by E: the FFN
        experts = moe.moe_layers()[0].experts.w1_EFD
        rows = experts.reshape(-1, experts.shape[-1])
        dense_rows = dense.layers[0].feed_forward.w1.weight
        # disjoint and complete: every dense hidden unit in exactly one expert
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, dense_rows.tolist()))


def load_hf_dense(tmp_path):
    dense_hf("llama", tmp_path / "dense")
    return load_hf(tmp_path / "dense")


def test_router_init_and_noise(tmp_path):
    dense = load_hf_dense(tmp_path)
    spec = up.UpcycleSpec(mode="copy", num_experts=4, top_k=2, router_init="normal", noise=0.01)
    moe = up.upcycle(dense, spec)
    router = moe.moe_layers()[0].router.weight_ED
    assert router.abs().max() > 0 and router.std().item() == pytest.approx(0.02, rel=0.3)
    noisy = up.copy.deepcopy(moe)
    up.add_noise(noisy, spec.noise, spec.seed)
    rep = up.report(dense, moe, spec, noisy)
    assert rep["preservation"]["max_abs"] < 1e-4
    assert rep["after_noise"]["max_abs"] > 10 * rep["preservation"]["max_abs"]
    w = noisy.moe_layers()[0].experts.w1_EFD
    assert not torch.equal(w[0], w[1])  # the copies differ after noise


def test_threshold_refuses_to_write(tmp_path, capsys):
    dense_hf("llama", tmp_path / "dense")
    code = upcycle_cli(tmp_path / "dense", tmp_path / "moe", "--mode", "shared",
                       "--num-experts", "4", "--top-k", "2", "--threshold", "-1")  # fmt: skip
    assert code == 1
    assert "nothing written" in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["--mode", "granular", "--num-experts", "6", "--top-k", "2", "--granularity", "4"],
            "must be multiples of the granularity",
        ),
        (["--mode", "copy", "--num-experts", "4", "--top-k", "6"], "--top-k: 6 exceeds"),
        (["--mode", "partition", "--num-experts", "5", "--top-k", "2"], "must divide it"),
        (
            ["--mode", "shared", "--num-experts", "4", "--top-k", "2", "--shared-fraction", "1.0"],
            "--shared-fraction",
        ),
    ],
)
def test_bad_requests_are_one_line(args, fragment, tmp_path, capsys):
    dense_hf("llama", tmp_path / "dense")
    capsys.readouterr()  # transformers' progress bars
    assert upcycle_cli(tmp_path / "dense", tmp_path / "moe", *args) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
    assert not (tmp_path / "moe").exists()


def test_no_exact_hf_target_and_unsupported_sources(tmp_path, capsys):
    dense_hf("qwen3", tmp_path / "dense")
    args = ["--mode", "shared", "--num-experts", "4", "--top-k", "2", "--format", "hf"]
    assert upcycle_cli(tmp_path / "dense", tmp_path / "moe", *args) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face architecture expresses --mode shared from qwen3" in err
    assert "use --format native" in err
    config = transformers.AutoConfig.for_model(
        "mixtral", **COMMON, num_local_experts=4, num_experts_per_tok=2
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mixtral")
    capsys.readouterr()
    args = ["--mode", "copy", "--num-experts", "4", "--top-k", "2"]
    assert upcycle_cli(tmp_path / "mixtral", tmp_path / "moe", *args) == 2
    assert "'mixtral' is not a dense architecture" in capsys.readouterr().err
