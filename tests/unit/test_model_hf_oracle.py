"""Oracle: dense moetrain models give the logits of ``transformers``' Llama / Mistral / Qwen3
with the same weights (fp32, eager attention)."""

import pytest
import torch

from moetrain.models import ModelConfig, Transformer
from moetrain.models.rope import RotaryEmbedding
from moetrain.moe.config import MoEConfig

transformers = pytest.importorskip("transformers")

SHAPES = dict(vocab_size=96, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
HIDDEN = 40
# moetrain suffix -> transformers suffix, per layer
LAYER_KEYS = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
ROPES = {
    "default": ({}, {"rope_type": "default"}),
    "linear": (
        dict(rope_scaling="linear", rope_scaling_factor=2.0),
        {"rope_type": "linear", "factor": 2.0},
    ),
    "yarn": (
        dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_seq_len=16),
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        },
    ),
}


def dense_cfg(**kw) -> ModelConfig:
    return ModelConfig(
        **SHAPES, dense_hidden_dim=HIDDEN, first_k_dense=2, max_seq_len=64, rope_theta=500.0,
        norm_eps=1e-6, init_std=0.1, moe=MoEConfig(dim=32), **kw,
    )  # fmt: skip


def hf_key(name: str) -> str:
    if name.startswith("layers."):
        _, idx, suffix = name.split(".", 2)
        return f"model.layers.{idx}.{LAYER_KEYS[suffix]}"
    return {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }[name]


def hf_model(model_cls, config_cls, cfg: ModelConfig, rope: dict, **extra):
    config = config_cls(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.dense_hidden_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_size,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={**rope, "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
        attn_implementation="eager", **extra,
    )  # fmt: skip
    return model_cls(config).eval()


def copy_weights(ours: Transformer, theirs) -> None:
    target = theirs.state_dict()
    with torch.no_grad():
        for name, tensor in ours.state_dict().items():
            target[hf_key(name)].copy_(tensor)


def assert_same_logits(ours: Transformer, theirs, seq_len=24) -> None:
    copy_weights(ours, theirs)
    x = torch.randint(0, ours.cfg.vocab_size, (2, seq_len))
    with torch.no_grad():
        want = theirs(input_ids=x).logits
        got = ours.eval()(x)
    assert got.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("tie", [False, True])
def test_llama_oracle(rope, tie):
    ours_rope, hf_rope = ROPES[rope]
    ours = Transformer(dense_cfg(tie_embeddings=tie, **ours_rope))
    theirs = hf_model(transformers.LlamaForCausalLM, transformers.LlamaConfig, ours.cfg, hf_rope)
    assert_same_logits(ours, theirs)


def test_mistral_sliding_window_oracle():
    ours = Transformer(dense_cfg(sliding_window=5))
    theirs = hf_model(
        transformers.MistralForCausalLM, transformers.MistralConfig, ours.cfg,
        ROPES["default"][1], sliding_window=5,
    )  # fmt: skip
    assert_same_logits(ours, theirs)


def test_qwen3_qk_norm_oracle():
    ours = Transformer(dense_cfg(qk_norm="head"))
    for name, p in ours.named_parameters():
        if "q_norm" in name or "k_norm" in name:  # non-trivial norm weights
            torch.nn.init.uniform_(p, 0.5, 1.5)
    theirs = hf_model(
        transformers.Qwen3ForCausalLM, transformers.Qwen3Config, ours.cfg, ROPES["default"][1]
    )
    assert_same_logits(ours, theirs)


def test_yarn_parameters_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig(
        dim=1024, num_heads=8, num_kv_heads=8, max_seq_len=163840, rope_scaling="yarn",
        rope_scaling_factor=40.0, rope_original_max_seq_len=4096, moe=MoEConfig(dim=1024),
    )  # fmt: skip
    hf_config = transformers.LlamaConfig(
        hidden_size=1024, num_attention_heads=8, head_dim=128, max_position_embeddings=163840,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096},
    )  # fmt: skip
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    rope = RotaryEmbedding(cfg)
    torch.testing.assert_close(rope.inv_freq(), inv_freq)
    assert rope.attention_factor == pytest.approx(attention_factor)
