"""Megatron-Core checkpoints in and out, verified against megatron-core 0.16 itself (one gloo
process, CPU, fp32): its GPTModel with MoE (local spec, SequentialMLP, a shared expert, sigmoid
routing with an expert bias) saved with its own ``dist_checkpointing`` as Megatron-LM's training
loop does, read by moetrain with the same logits; moetrain's ``--format megatron`` export loaded
by megatron-core with the same logits; and the one-line refusals of what cannot be read."""

from __future__ import annotations

import argparse
import functools
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

import moetrain
from moetrain.checkpoint import convert
from moetrain.checkpoint.megatron import COMMON, is_megatron_dir
from moetrain.checkpoint.native import save_model
from moetrain.checkpoint.source import source_format
from moetrain.models import ModelConfig, Transformer
from moetrain.moe.config import MoEConfig
from moetrain.testing import mcore_gpt as mg

ATOL = 1e-5


@pytest.fixture(scope="module")
def megatron(tmp_path_factory):
    """A one-process gloo group with Megatron-Core patched for the CPU (undone afterwards)."""
    from megatron.core import parallel_state

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    root = tmp_path_factory.mktemp("mcore")
    dist.init_process_group("gloo", init_method=f"file://{root / 'pg'}", rank=0, world_size=1)
    with pytest.MonkeyPatch.context() as mp:
        mg.patch_for_cpu(functools.partial(mp.setattr, raising=False))
        mg.patch_grouped_gemm(mp.setattr)
        try:
            yield root
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def tokens(vocab: int = 64, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


def saved(root: Path, name: str, metadata=None, model_out: list | None = None, **overrides):
    """(args, Megatron's logits on :func:`tokens`, its save directory) of a tiny GPT; the
    model itself is appended to ``model_out``."""
    args = mg.tiny_args(**overrides)
    mg.init_parallel(args)
    model = mg.build_gpt(args)
    mg.save_checkpoint(model, args, root / name, metadata=metadata)
    if model_out is not None:
        model_out.append(model)
    return args, mg.logits(model, tokens(args.padded_vocab_size)), root / name


def megatron_logits_of(path: Path, args: argparse.Namespace) -> torch.Tensor:
    """Megatron-Core's logits after loading ``path/release`` into a freshly drawn model."""
    model = mg.build_gpt(args, seed=7, bias_seed=None)
    mg.load_checkpoint(model, path / "release")
    return mg.logits(model, tokens(args.padded_vocab_size))


@pytest.fixture(scope="module")
def base(megatron):
    """The default tiny GPT, saved once: (args, Megatron's logits, save directory)."""
    return saved(megatron, "base")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.timeout(120)
def test_import_and_export_match_megatron(base, tmp_path):
    args, want, ckpt = base
    mg.init_parallel(args)
    assert is_megatron_dir(ckpt) and is_megatron_dir(ckpt / "iter_0000010")
    assert source_format(ckpt).name == "megatron"
    ours = moetrain.load_model(ckpt)
    cfg = ours.cfg
    assert (cfg.num_kv_heads, cfg.tie_embeddings, cfg.first_k_dense) == (2, False, 0)
    assert (cfg.moe.score_func, cfg.moe.bias_update_rate, cfg.moe.shared_hidden) == (
        "sigmoid",
        1e-3,
        16,
    )
    with torch.no_grad():
        diff = max_diff(ours(tokens()), want)
    print(f"import: max |logit diff| vs megatron-core = {diff:.3g}")
    assert diff <= ATOL
    # the reverse: moetrain-convert --format megatron, loaded by megatron-core itself
    out = tmp_path / "exported"
    assert convert.main(["--from", str(ckpt), "--to", str(out), "--format", "megatron"]) == 0
    diff = max_diff(megatron_logits_of(out, args), want)
    print(f"export: max |logit diff| vs megatron-core = {diff:.3g}")
    assert diff <= ATOL


@pytest.mark.timeout(120)
def test_megatron_to_hub_loads_in_transformers_with_megatrons_logits(megatron, tmp_path):
    """Three independent implementations agree: megatron-core's logits and those of the hub
    export of its checkpoint (``--format hf``, here Mixtral's layout: a softmax router, no
    shared expert) run by ``transformers``."""
    transformers = pytest.importorskip("transformers")
    args, want, ckpt = saved(megatron, "hub_source", **VARIANTS["softmax_no_bias_no_shared"])
    out = tmp_path / "hub"
    assert convert.main(["--from", str(ckpt), "--to", str(out), "--format", "hf"]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    with torch.no_grad():
        logits = theirs.eval()(tokens(args.padded_vocab_size)).logits.float()
    diff = max_diff(logits, want)
    print(f"megatron -> hub ({theirs.config.model_type}): max |logit diff| = {diff:.3g}")
    assert diff <= ATOL


VARIANTS = {
    # GroupedMLP (the grouped-GEMM expert weights weight1/weight2), run by megatron-core itself
    "grouped_gemm": dict(moe_grouped_gemm=True),
    # a dense first layer: one key per layer, a dense SwiGLU MLP
    "dense_first": dict(moe_layer_freq=[0, 1]),
    "tied_qknorm_qkvbias": dict(
        untie_embeddings_and_output_weights=False, qk_layernorm=True, add_qkv_bias=True
    ),
    "softmax_no_bias_no_shared": dict(
        moe_router_score_function="softmax",
        moe_router_enable_expert_bias=False,
        moe_shared_expert_intermediate_size=None,
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_round_trip(megatron, tmp_path, variant):
    args, want, ckpt = saved(megatron, variant, **VARIANTS[variant])
    with torch.no_grad():
        assert max_diff(moetrain.load_model(ckpt)(tokens()), want) <= ATOL
    out = tmp_path / "exported"
    assert convert.main(["--from", str(ckpt), "--to", str(out), "--format", "megatron"]) == 0
    assert max_diff(megatron_logits_of(out, args), want) <= ATOL


@pytest.mark.timeout(120)
def test_one_key_per_expert_layout(megatron):
    """``singleton_local_shards``: experts and SwiGLU halves under keys of their own."""
    _, want, ckpt = saved(megatron, "singleton", metadata={"singleton_local_shards": True})
    with torch.no_grad():
        assert max_diff(moetrain.load_model(ckpt)(tokens()), want) <= ATOL


def moetrain_model(vocab: int = 64, **kw) -> Transformer:
    torch.manual_seed(0)
    moe = MoEConfig(
        num_experts=4, top_k=2, dim=32, hidden_dim=16, score_func="sigmoid",
        bias_update_rate=1e-3, num_shared_experts=1, aux_loss_coeff=0.0,
    )  # fmt: skip
    cfg = ModelConfig(
        vocab_size=vocab, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
        dense_hidden_dim=64, max_seq_len=64, first_k_dense=0, moe=moe, **kw,
    )  # fmt: skip
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.expert_bias_E.normal_(0, 0.1)
    return model


@pytest.mark.timeout(120)
def test_moetrain_checkpoint_exports_to_megatron(megatron, tmp_path):
    model = moetrain_model()
    save_model(model, tmp_path / "native")
    out = tmp_path / "megatron"
    code = convert.main(
        ["--from", str(tmp_path / "native"), "--to", str(out), "--format", "megatron", "--verify"]
    )
    assert code == 0
    with torch.serialization.safe_globals([argparse.Namespace]):
        written = torch.load(out / "release" / COMMON, weights_only=True)["args"]
    args = mg.tiny_args(**vars(written))
    mg.init_parallel(args)
    with torch.no_grad():
        want = model(tokens())
    diff = max_diff(megatron_logits_of(out, args), want)
    print(f"moetrain -> megatron-core: max |logit diff| = {diff:.3g}")
    assert diff <= ATOL


def rewrite_args(src: Path, dst: Path, **changes) -> Path:
    """A copy of the iteration directory ``src`` whose args are changed."""
    shutil.copytree(src, dst)
    with torch.serialization.safe_globals([argparse.Namespace]):
        common = torch.load(dst / COMMON, weights_only=True)
    for name, value in changes.items():
        if value is None:
            delattr(common["args"], name)
        else:
            setattr(common["args"], name, value)
    torch.save(common, dst / COMMON)
    return dst


def convert_fails(src: Path, dst: Path, capsys, *extra: str) -> str:
    code = convert.main(["--from", str(src), "--to", str(dst), "--format", "native", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not dst.exists()
    return err


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (dict(swiglu=False), "swiglu=False"),
        (dict(mtp_num_layers=1), "mtp_num_layers=1"),
        (dict(fp8="hybrid"), "fp8"),
        (dict(normalization="LayerNorm"), "LayerNorm"),
        (dict(multi_latent_attention=True), "multi-latent attention"),
    ],
)
def test_unsupported_features_are_one_line(base, tmp_path, capsys, changes, named):
    ckpt = base[2]
    src = rewrite_args(ckpt / "iter_0000010", tmp_path / "src", **changes)
    err = convert_fails(src, tmp_path / "out", capsys)
    assert named in err and "moetrain cannot express it" in err


@pytest.mark.timeout(120)
def test_missing_args_are_named_and_can_be_given(base, tmp_path, capsys):
    _, want, ckpt = base
    src = rewrite_args(ckpt / "iter_0000010", tmp_path / "src", padded_vocab_size=None)
    err = convert_fails(src, tmp_path / "out", capsys)
    assert "padded_vocab_size" in err and "--megatron-arg" in err
    out = tmp_path / "ok"
    extra = ["--megatron-arg", "padded_vocab_size=64"]
    assert convert.main(["--from", str(src), "--to", str(out), "--format", "native", *extra]) == 0
    with torch.no_grad():
        assert max_diff(moetrain.load_model(out)(tokens()), want) <= ATOL


class Payload:
    """Anything but the allow-listed classes: refused before it is built."""


@pytest.mark.timeout(120)
def test_pickled_objects_beyond_the_allow_list_are_refused(base, tmp_path, capsys):
    from megatron.core.transformer.enums import AttnBackend

    _, want, ckpt = base
    # Megatron-LM's args hold an AttnBackend enum: read through a stand-in, never imported
    src = rewrite_args(ckpt / "iter_0000010", tmp_path / "enum", attention_backend=AttnBackend.auto)
    with torch.no_grad():
        assert max_diff(moetrain.load_model(src)(tokens()), want) <= ATOL
    src = rewrite_args(ckpt / "iter_0000010", tmp_path / "evil", evil=Payload())
    err = convert_fails(src, tmp_path / "out", capsys)
    assert "Payload" in err and "does not unpickle" in err


@pytest.mark.timeout(60)
def test_a_pickled_dcp_metadata_beyond_the_allow_list_is_refused(base, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(base[2] / "iter_0000010", src)
    (src / ".metadata").write_bytes(pickle.dumps(Payload()))
    err = convert_fails(src, tmp_path / "out", capsys)
    assert "Payload" in err and "does not unpickle" in err


@pytest.mark.timeout(120)
def test_tensors_the_args_do_not_state_are_refused(megatron, tmp_path, capsys):
    """q/k/v biases stored but add_qkv_bias=False in the args: refused, not dropped."""
    _, _, ckpt = saved(megatron, "qkv_bias", add_qkv_bias=True)
    src = rewrite_args(ckpt / "iter_0000010", tmp_path / "src", add_qkv_bias=False)
    err = convert_fails(src, tmp_path / "out", capsys)
    assert "linear_qkv.bias" in err and "no place for" in err


@pytest.mark.timeout(60)
def test_legacy_per_rank_format_is_refused(tmp_path, capsys):
    legacy = tmp_path / "iter_0000010" / "mp_rank_00"
    legacy.mkdir(parents=True)
    (legacy / "model_optim_rng.pt").write_bytes(b"not read")
    err = convert_fails(tmp_path / "iter_0000010", tmp_path / "out", capsys)
    assert "legacy per-rank format" in err and "torch_dist" in err


@pytest.mark.timeout(60)
def test_export_of_an_inexpressible_model_writes_nothing(tmp_path, capsys):
    save_model(moetrain_model(sliding_window=8), tmp_path / "native")
    out = tmp_path / "out"
    code = convert.main(
        ["--from", str(tmp_path / "native"), "--to", str(out), "--format", "megatron"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "model.sliding_window=8" in err, err
    assert not out.exists()


@pytest.mark.timeout(60)
def test_init_from_a_different_model_names_the_fields(base):
    from moetrain.checkpoint.errors import CheckpointError
    from moetrain.checkpoint.megatron_io import load_megatron_weights

    _, _, ckpt = base
    cfg = moetrain.load_model(ckpt).cfg
    cfg.num_layers += 1
    with pytest.raises(CheckpointError, match=r"is a different model: model\.num_layers: 3 here"):
        load_megatron_weights(ckpt, Transformer(cfg), cfg)


@pytest.mark.timeout(120)
def test_init_from_continues_from_megatrons_loss(megatron, tmp_path):
    """``checkpoint.init_from=<megatron save dir>``: the first training step's loss is
    Megatron-Core's loss on that batch."""
    from moetrain.config.validate import validate
    from moetrain.testing.layouts import layout_config, write_token_dir
    from moetrain.train.trainer import Trainer

    built: list = []
    _, _, ckpt = saved(megatron, "train", model_out=built, padded_vocab_size=384)
    data = write_token_dir(str(tmp_path / "tokens"), num_tokens=5_000)
    cfg = layout_config(
        data, ["train.global_batch_size=2", "train.micro_batch_size=2", "train.seq_len=16"]
    )
    cfg.model = moetrain.load_model(ckpt).cfg  # the config the checkpoint's args give
    cfg.checkpoint.init_from = str(ckpt)
    validate(cfg)
    trainer = Trainer(cfg, tmp_path / "run")
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    lm_loss = trainer._lm_loss

    def recording(inputs_BS: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        batches.append((inputs_BS.clone(), targets_BS.clone()))
        return lm_loss(inputs_BS, targets_BS)

    trainer._lm_loss = recording  # type: ignore[method-assign]
    try:
        ours = trainer.train_step()[0]["loss"]
    finally:
        trainer.close()
    theirs = sum(mg.loss(built[0], x, y) for x, y in batches) / len(batches)
    print(f"first loss: moetrain {ours:.7f}, megatron-core {theirs:.7f}")
    assert abs(ours - theirs) <= ATOL


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "moe_kw",
    [
        dict(
            score_func="sigmoid", bias_update_rate=0.0, num_shared_experts=1,
            shared_hidden_dim=24, shared_gate=True,
        ),
        dict(norm_topk_prob=False, aux_loss_scope="sequence", z_loss_coeff=1e-3),
        dict(
            score_func="sigmoid", num_groups=2, topk_groups=1, top_k=2, bias_update_rate=1e-3,
            routed_scaling_factor=2.5, capacity_factor=1.5, drop_policy="position",
        ),
    ],
)  # fmt: skip
def test_config_round_trips_through_megatron_args(moe_kw):
    from moetrain.checkpoint.megatron_config import args_from_config, config_from_args

    # min_capacity 0: Megatron has no floor under the capacity
    moe = MoEConfig(**{"num_experts": 4, "dim": 32, "hidden_dim": 16, "min_capacity": 0, **moe_kw})
    cfg = ModelConfig(
        vocab_size=64, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
        dense_hidden_dim=48, max_seq_len=64, first_k_dense=1, qkv_bias=True, qk_norm="head",
        tie_embeddings=True, rope_theta=5e5, norm_eps=1e-6, moe=moe,
    )  # fmt: skip
    assert config_from_args(args_from_config(cfg, torch.bfloat16)) == cfg
