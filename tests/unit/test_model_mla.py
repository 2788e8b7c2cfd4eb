"""Multi-head latent attention (``model.attention=mla``): ``transformers``' DeepSeek-V3 as the
oracle, training step, meta-device init, accounting and validation."""

import pytest
import torch
import torch.nn.functional as F

from moetrain.config.schema import Config, ParallelConfig
from moetrain.config.validate import validate
from moetrain.models import ModelConfig, Transformer
from moetrain.models.attention import MLAttention
from moetrain.models.rope import RotaryEmbedding
from moetrain.moe.config import MoEConfig
from moetrain.parallel.dims import LayoutError

D = 32
MLA = dict(
    vocab_size=96, dim=D, num_layers=2, num_heads=4, attention="mla", kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=12, dense_hidden_dim=40, max_seq_len=64,
)  # fmt: skip
# moetrain suffix -> transformers suffix, per layer
LAYER_KEYS = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq_a.weight": "self_attn.q_a_proj.weight",
    "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attention.wq_b.weight": "self_attn.q_b_proj.weight",
    "attention.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attention.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
# name -> (our fields, transformers' rope_parameters)
ROPES = {
    "default": ({}, {"rope_type": "default"}),
    "yarn": (
        dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_seq_len=16),
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "yarn_mscale": (  # DeepSeek-V3: mscale = mscale_all_dim = 1
        dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_seq_len=16,
             yarn_mscale=1.0, yarn_mscale_all_dim=1.0),
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
         "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    "yarn_mscale_uneven": (  # cos/sin scaled by m(0.9) / m(0.5), the softmax by m(0.5)**2
        dict(rope_scaling="yarn", rope_scaling_factor=8.0, rope_original_max_seq_len=8,
             yarn_mscale=0.9, yarn_mscale_all_dim=0.5),
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8,
         "mscale": 0.9, "mscale_all_dim": 0.5},
    ),
    "yarn_mscale_all_dim_only": (  # transformers: cos/sin by m(1), the softmax by m(0.7)**2
        dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_seq_len=16,
             yarn_mscale=0.0, yarn_mscale_all_dim=0.7),
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
         "mscale_all_dim": 0.7},
    ),
}  # fmt: skip

transformers = pytest.importorskip("transformers")


def mla_cfg(**kw) -> ModelConfig:
    moe = kw.pop("moe", {})
    fields = {**MLA, "first_k_dense": MLA["num_layers"], "rope_theta": 500.0, "init_std": 0.1}
    return ModelConfig(**{**fields, **kw}, moe=MoEConfig(dim=D, hidden_dim=24, **moe))


def hf_key(name: str) -> str:
    if name.startswith("layers."):
        _, idx, suffix = name.split(".", 2)
        return f"model.layers.{idx}.{LAYER_KEYS[suffix]}"
    return {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }[name]


def hf_deepseek_v3(cfg: ModelConfig, rope: dict):
    config = transformers.DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.dense_hidden_dim,
        num_hidden_layers=cfg.num_layers, first_k_dense_replace=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, rope_interleave=cfg.rope_interleave,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={**rope, "rope_theta": cfg.rope_theta}, attention_bias=False,
        tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    return transformers.DeepseekV3ForCausalLM(config).eval()


def randomize_norms(model: Transformer) -> None:
    """Norm weights away from 1, so a norm applied in the wrong place shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                torch.nn.init.uniform_(p, 0.5, 1.5)


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("q_lora_rank", [None, 20])
def test_deepseek_v3_oracle(q_lora_rank, interleave, rope):
    ours_rope, hf_rope = ROPES[rope]
    torch.manual_seed(0)
    # norm_eps 1e-5 differs from the latent norms' fixed 1e-6, as in transformers
    cfg = mla_cfg(q_lora_rank=q_lora_rank, rope_interleave=interleave, norm_eps=1e-5, **ours_rope)
    ours = Transformer(cfg).eval()
    randomize_norms(ours)
    theirs = hf_deepseek_v3(cfg, hf_rope)
    target = theirs.state_dict()
    ours_state = ours.state_dict()
    assert {hf_key(n) for n in ours_state} == set(target)  # every weight mapped, none left
    with torch.no_grad():
        for name, tensor in ours_state.items():
            target[hf_key(name)].copy_(tensor)
    for ours_layer, hf_layer in zip(ours.layers, theirs.model.layers):
        assert ours_layer.attention.scale == pytest.approx(hf_layer.self_attn.scaling, rel=1e-12)
    x = torch.randint(0, cfg.vocab_size, (2, 24))  # past the YaRN original context of 16 / 8
    with torch.no_grad():
        want = theirs(input_ids=x).logits
        got = ours(x)
    assert got.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rope_interleave_changes_the_model():
    """The oracle's interleave cases are not vacuous: the same weights give other logits."""
    x = torch.randint(0, 96, (2, 12))
    logits = []
    for interleave in (True, False):
        torch.manual_seed(0)
        logits.append(Transformer(mla_cfg(rope_interleave=interleave)).eval()(x))
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)


@pytest.mark.parametrize("rope", [r for r in sorted(ROPES) if r != "default"])
def test_yarn_rope_dim_and_factors_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ours_rope, hf_rope = ROPES[rope]
    cfg = mla_cfg(**ours_rope)
    hf_config = hf_deepseek_v3(cfg, hf_rope).config
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    ours = RotaryEmbedding(cfg)
    assert ours.head_dim == cfg.qk_rope_head_dim
    torch.testing.assert_close(ours.inv_freq(), inv_freq)
    assert ours.attention_factor == pytest.approx(attention_factor, rel=1e-12)


@pytest.mark.parametrize("q_lora_rank", [None, 20])
def test_training_step_with_moe_layers_has_finite_gradients(q_lora_rank):
    cfg = mla_cfg(q_lora_rank=q_lora_rank, num_layers=3, first_k_dense=1, max_seq_len=32)
    model = Transformer(cfg)
    for block in model.layers:  # the path parallel.activation_checkpointing takes
        block.activation_checkpointing = True
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    logits = model(x[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "attention" in name:
            assert p.grad.abs().sum() > 0, name
    assert len(model.moe_layers()) == 2


@pytest.mark.parametrize("q_lora_rank", [None, 20])
def test_meta_build_then_init_weights_equals_direct_build(q_lora_rank):
    cfg = mla_cfg(q_lora_rank=q_lora_rank, first_k_dense=1, moe=dict(num_shared_experts=1))
    torch.manual_seed(4)
    direct = Transformer(cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(4)
    model.init_weights()
    assert direct.state_dict().keys() == model.state_dict().keys()
    for (name, p), q in zip(direct.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)
    attn = direct.layers[0].attention
    assert isinstance(attn, MLAttention)
    assert torch.equal(attn.kv_norm.weight, torch.ones(16))
    assert attn.wkv_b.weight.std().item() == pytest.approx(0.1, rel=0.2)


def test_sliding_window_limits_the_receptive_field():
    w, t = 3, 9
    x = torch.randint(0, 96, (2, 12))
    y = x.clone()
    y[:, : t - w + 1] = (y[:, : t - w + 1] + 5) % 96
    model = Transformer(mla_cfg(num_layers=1, sliding_window=w)).eval()
    torch.testing.assert_close(model(x)[:, t], model(y)[:, t], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(model(x)[:, t + 1 - w], model(y)[:, t + 1 - w])


def test_flops_count_qk_and_v_head_dims():
    model = Transformer(mla_cfg())
    matmul_params = model.num_params() - 96 * D
    attention = 6 * 2 * 4 * ((8 + 6) + 12) * 16
    assert model.flops_per_token(16) == 6 * matmul_params + attention


def test_param_count_of_one_mla_layer():
    q, kv, H, n, r, v = 20, 16, 4, 8, 6, 12
    attn = MLAttention(mla_cfg(q_lora_rank=q))
    expected = D * q + q + q * H * (n + r) + D * (kv + r) + kv + kv * H * (n + v) + H * v * D
    assert sum(p.numel() for p in attn.parameters()) == expected


def test_num_kv_heads_is_ignored_by_mla():
    cfg = mla_cfg(num_kv_heads=3)  # would not divide num_heads=4 under GQA
    assert cfg.rope_head_size == 6 and cfg.qk_head_size == 14 and cfg.v_head_size == 12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(attention="mha"), r"model\.attention: must be one of gqa, mla; got 'mha'"),
        (dict(kv_lora_rank=0), r"model\.kv_lora_rank: must be a positive integer, got 0"),
        (dict(qk_nope_head_dim=0), r"model\.qk_nope_head_dim: must be a positive integer"),
        (dict(qk_rope_head_dim=5), r"model\.qk_rope_head_dim: must be even for RoPE, got 5"),
        (dict(v_head_dim=-1), r"model\.v_head_dim: must be a positive integer, got -1"),
        (dict(q_lora_rank=0), r"model\.q_lora_rank: must be a positive integer, got 0"),
        (dict(head_dim=16), r"model\.head_dim: is unused with model\.attention=mla"),
        (dict(qkv_bias=True), r"model\.qkv_bias: is not supported with model\.attention=mla"),
        (dict(qk_norm="head"), r"model\.qk_norm: 'head' is not supported with model\.attention"),
        (
            dict(yarn_mscale_all_dim=1.0),
            r"model\.yarn_mscale_all_dim: applies to model\.rope_scaling=yarn only \(got 'none'\)",
        ),
        (dict(yarn_mscale=0.5), r"model\.yarn_mscale: applies to model\.rope_scaling=yarn only"),
        (
            dict(rope_scaling="yarn", rope_scaling_factor=4.0, yarn_mscale_all_dim=-1.0),
            r"model\.yarn_mscale_all_dim: must be >= 0 \(0 = off\), got -1\.0",
        ),
    ],
)
def test_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mla_cfg(**kwargs)


def test_tensor_parallel_with_mla_is_rejected(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = Config(model=mla_cfg(), parallel=ParallelConfig(tp=2))
    cfg.train.seq_len = 32
    with pytest.raises(LayoutError, match=r"model\.attention: 'mla' does not support tensor "
                       r"parallelism \(parallel\.tp=2\); use parallel\.tp=1"):  # fmt: skip
        validate(cfg)
    cfg.parallel.tp = 1
    cfg.parallel.dp_shard = 2
    validate(cfg)  # the same model is fine without TP


def test_pipeline_stages_compose_to_the_model():
    """Pipeline chunks (one process) carry the model's rope, so MLA needs nothing of them."""
    from moetrain.parallel.parallelize import PipelineChunk

    model = Transformer(mla_cfg(num_layers=3, first_k_dense=1)).eval()
    first = PipelineChunk(model, range(0, 2), first=True, last=False)
    last = PipelineChunk(model, range(2, 3), first=False, last=True)
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(last(first(x)), model(x), atol=0, rtol=0)


def test_tensor_parallel_plan_refuses_an_mla_block():
    from moetrain.parallel.tp import apply_tp_block

    block = Transformer(mla_cfg(num_layers=1)).layers[0]
    with pytest.raises(ValueError, match=r"model\.attention: 'mla' does not support tensor"):
        apply_tp_block(block, tp_mesh=None, etp=1)  # refused before the mesh is used
