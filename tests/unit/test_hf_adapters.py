"""Hugging Face adapters against ``transformers`` itself: tiny random models built from its own
classes and saved with ``save_pretrained`` import with equal logits (fp32, atol 1e-5); exports
load in ``transformers`` with equal logits; round trips keep every tensor bit-identical."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moetrain.checkpoint import CheckpointError
from moetrain.checkpoint.hf import (
    ExportError,
    arch_of,
    config_to_hf,
    load_hf,
    save_hf,
)
from moetrain.checkpoint.safetensors_io import INDEX_FILE, read_tensors
from moetrain.models import ModelConfig, Transformer
from moetrain.moe.config import MoEConfig

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)  # fmt: skip
CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        intermediate_size=56,
        shared_expert_intermediate_size=40,
        mlp_only_layers=[0],
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        head_dim=16,
        norm_topk_prob=True,
        intermediate_size=48,
    ),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=24),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        intermediate_size=48,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        num_key_value_heads=4,
        num_nextn_predict_layers=0,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        },
    ),
    "llama": dict(intermediate_size=48, rope_parameters={"rope_type": "linear", "factor": 2.0}),
    "mistral": dict(intermediate_size=48, sliding_window=5, head_dim=16),
    "qwen2": dict(intermediate_size=48, tie_word_embeddings=True),
    "qwen3": dict(intermediate_size=48, head_dim=16),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that routing and every norm matter (HF inits norms to 1 and some
    projections to 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if not p.is_floating_point() or "inv_freq" in name:
                continue
            if "e_score_correction_bias" in name:  # DeepSeek-V3's routing bias: order-1 values
                p.copy_(torch.rand(p.shape, generator=gen))
            elif p.dim() == 1 and ("norm" in name or "layernorm" in name):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def hf_checkpoint(arch: str, path: Path, **overrides):
    fields = {**COMMON, **CONFIGS[arch], **overrides}
    config = transformers.AutoConfig.for_model(arch, **fields)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize(model.float())
    model.save_pretrained(path)
    return model.eval()


def tokens(vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


def hf_logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(path)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_import_matches_transformers_logits(arch, tmp_path):
    theirs = hf_checkpoint(arch, tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    x = tokens()
    want = hf_logits(theirs, x)
    with torch.no_grad():
        got = ours(x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_export_loads_in_transformers_and_round_trips_bit_identical(arch, tmp_path):
    hf_checkpoint(arch, tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    save_hf(ours, tmp_path / "out", arch)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    ).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_logits(theirs, x), atol=1e-5, rtol=1e-5)
    # hub -> moetrain -> hub: the same tensor names, every tensor bit for bit
    before, after = tensors_of(tmp_path / "hf"), tensors_of(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def moe_cfg(**kw) -> ModelConfig:
    moe = dict(num_experts=4, top_k=2, dim=32, hidden_dim=24)
    moe.update(kw.pop("moe", {}))
    fields = dict(
        vocab_size=96, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, dense_hidden_dim=40,
        max_seq_len=64, first_k_dense=0,
    )  # fmt: skip
    return ModelConfig(**{**fields, **kw}, moe=MoEConfig(**moe))


MOETRAIN_MODELS = {
    "mixtral": dict(),
    "qwen2_moe": dict(
        first_k_dense=1,
        qkv_bias=True,
        moe=dict(
            num_shared_experts=1, shared_hidden_dim=40, shared_gate=True, norm_topk_prob=False
        ),
    ),
    "qwen2_moe_unshared": dict(first_k_dense=1),  # no shared expert: one of size 0
    "qwen3_moe": dict(qk_norm="head", moe_layer_freq=2, head_dim=16),
    "olmoe": dict(qk_norm="full", moe=dict(norm_topk_prob=False)),
    "deepseek_v3": dict(
        attention="mla",
        num_kv_heads=4,  # MLA: one key and value per head
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        first_k_dense=1,
        moe=dict(
            score_func="sigmoid",
            num_groups=2,
            topk_groups=1,
            routed_scaling_factor=2.0,
            num_shared_experts=1,
            bias_update_rate=0.001,
            aux_loss_coeff=0.0001,
            aux_loss_scope="sequence",
        ),
    ),
}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers' init
@pytest.mark.parametrize("arch", sorted(MOETRAIN_MODELS))
def test_moetrain_to_hub_to_moetrain_is_bit_identical(arch, tmp_path):
    torch.manual_seed(0)
    ours = Transformer(moe_cfg(**MOETRAIN_MODELS[arch])).eval()
    if ours.cfg.moe.bias_update_rate is not None:  # a trained aux-loss-free bias (deepseek_v3)
        for layer in ours.moe_layers():
            layer.router.expert_bias_E.uniform_(-0.5, 0.5)
    arch = arch.removesuffix("_unshared")
    assert arch_of(ours.cfg) == arch
    save_hf(ours, tmp_path / "hf", arch)
    back = load_hf(tmp_path / "hf")
    if ours.cfg.num_moe_layers == ours.cfg.num_layers:  # no dense MLP: its size is not stored
        assert back.cfg == dataclasses.replace(ours.cfg, dense_hidden_dim=24)
    else:
        assert back.cfg == ours.cfg
    state = ours.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    ).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_logits(theirs, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("arch", "kw", "fragment"),
    [
        ("mixtral", dict(first_k_dense=1), "1 dense layers"),
        ("mixtral", dict(moe=dict(num_shared_experts=1)), "num_shared_experts=1"),
        ("mixtral", dict(qk_norm="head"), "model.qk_norm=head"),
        ("qwen3_moe", dict(), "model.qk_norm=none"),
        ("olmoe", dict(qk_norm="full", moe=dict(bias_update_rate=0.001)), "bias_update_rate"),
        ("qwen2_moe", dict(moe=dict(num_shared_experts=2)), "one gated shared expert or none"),
        ("llama", dict(), "MoE layers"),
        ("mixtral", dict(moe=dict(score_func="sigmoid")), "score_func=sigmoid"),
    ],
)
def test_export_to_an_architecture_that_cannot_express_the_model_fails_clearly(
    arch, kw, fragment, tmp_path
):
    model = Transformer(moe_cfg(**kw))
    with pytest.raises(ExportError, match=f"cannot export to {arch}") as err:
        save_hf(model, tmp_path / "out", arch)
    assert fragment in str(err.value)
    assert not (tmp_path / "out").exists()


def test_large_export_is_sharded_with_an_index(tmp_path):
    torch.manual_seed(0)
    ours = Transformer(moe_cfg())
    save_hf(ours, tmp_path / "hf", "mixtral", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "hf" / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and all((tmp_path / "hf" / f).is_file() for f in files)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    total = 0
    for f in files:
        with safe_open(str(tmp_path / "hf" / f), "pt") as handle:
            total += sum(handle.get_tensor(k).nbytes for k in handle.keys())  # noqa: SIM118
    assert index["metadata"]["total_size"] == total
    back = load_hf(tmp_path / "hf")
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[name]), name


def test_truncated_shard_is_named(tmp_path):
    ours = Transformer(moe_cfg())
    save_hf(ours, tmp_path / "hf", "mixtral", max_shard_bytes=20_000)
    shard = sorted((tmp_path / "hf").glob("model-00002-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=shard.name):
        load_hf(tmp_path / "hf")


def test_pickled_weights_are_refused(tmp_path):
    hf_checkpoint("llama", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights"):
        load_hf(tmp_path / "hf")


def test_missing_and_unknown_tensors_are_errors(tmp_path):
    from safetensors.torch import save_file

    hf_checkpoint("mixtral", tmp_path / "hf")
    state = read_tensors(tmp_path / "hf")
    state["model.layers.0.block_sparse_moe.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"block_sparse_moe\.extra\.weight"):
        load_hf(tmp_path / "hf")
    del state["model.layers.0.block_sparse_moe.extra.weight"]
    del state["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"experts\.3\.w2\.weight"):
        load_hf(tmp_path / "hf")


def test_export_writes_a_config_transformers_reads(tmp_path):
    cfg = moe_cfg(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_seq_len=16)
    config = config_to_hf(cfg, "mixtral", torch.float32)
    assert config["model_type"] == "mixtral"
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["rope_parameters"]["rope_type"] == "yarn"
