"""The decoder: causality, sliding window, GQA, QK-norm, RoPE, init, accounting, training step."""

import math

import pytest
import torch
import torch.nn.functional as F

from moetrain.models import ModelConfig, Transformer
from moetrain.models.attention import Attention
from moetrain.models.rope import RotaryEmbedding, apply_rope
from moetrain.moe.baseline_routers import hash_token_ids
from moetrain.moe.config import MoEConfig
from moetrain.moe.layer import MoELayer

D = 32
SMALL = dict(vocab_size=64, dim=D, num_layers=3, num_heads=4, num_kv_heads=2, dense_hidden_dim=48)


def small_cfg(**kw) -> ModelConfig:
    moe = kw.pop("moe", {})
    return ModelConfig(**{**SMALL, **kw}, moe=MoEConfig(dim=D, hidden_dim=24, **moe))


def small_model(**kw) -> Transformer:
    model = Transformer(small_cfg(init_std=0.2, **kw))  # larger std: logits far above tolerance
    return model.eval()


def tokens(B=2, S=12, vocab=64):
    return torch.randint(0, vocab, (B, S))


@pytest.mark.parametrize("first_k_dense", [1, 3])
def test_future_tokens_do_not_change_past_logits(first_k_dense):
    model = small_model(first_k_dense=first_k_dense)
    x = tokens()
    t = 5
    y = x.clone()
    y[:, t + 1 :] = (y[:, t + 1 :] + 7) % 64
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_sliding_window_limits_the_receptive_field():
    """One dense layer: logits at t see tokens t-w+1..t only; without the window they see all."""
    w, t = 3, 9
    x = tokens()
    y = x.clone()
    y[:, : t - w + 1] = (y[:, : t - w + 1] + 5) % 64
    torch.manual_seed(1)
    windowed = small_model(num_layers=1, first_k_dense=1, sliding_window=w)
    torch.manual_seed(1)
    full = small_model(num_layers=1, first_k_dense=1)
    torch.testing.assert_close(windowed(x)[:, t], windowed(y)[:, t], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(full(x)[:, t], full(y)[:, t])
    assert not torch.allclose(windowed(x)[:, t - 1 : t + 1], full(x)[:, t - 1 : t + 1])


def reference_attention(attn: Attention, x_BSD, cos_Sd, sin_Sd, num_heads, num_kv_heads):
    """Explicit GQA: K/V heads repeated, softmax over a causal mask, no SDPA."""
    B, S, _ = x_BSD.shape
    d = attn.head_dim
    q = apply_rope(attn.wq(x_BSD).view(B, S, num_heads, d), cos_Sd, sin_Sd).transpose(1, 2)
    k = apply_rope(attn.wk(x_BSD).view(B, S, num_kv_heads, d), cos_Sd, sin_Sd).transpose(1, 2)
    v = attn.wv(x_BSD).view(B, S, num_kv_heads, d).transpose(1, 2)
    group = num_heads // num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return attn.wo((probs @ v).transpose(1, 2).reshape(B, S, -1))


@pytest.mark.parametrize(
    ("heads", "kv_heads", "bias"), [(4, 2, False), (4, 1, True), (4, 4, False)]
)
def test_gqa_matches_explicit_reference(heads, kv_heads, bias):
    cfg = small_cfg(num_heads=heads, num_kv_heads=kv_heads, qkv_bias=bias)
    attn = Attention(cfg)
    if bias:
        torch.nn.init.normal_(attn.wq.bias)
    x = torch.randn(2, 7, D)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(7))
    want = reference_attention(attn, x, cos, sin, heads, kv_heads)
    torch.testing.assert_close(attn(x, cos, sin), want, atol=1e-5, rtol=1e-5)


def test_qk_norm_variants_run_and_differ():
    x = tokens()
    outs = {}
    for mode in ("none", "head", "full"):
        torch.manual_seed(3)
        model = small_model(qk_norm=mode)
        outs[mode] = model(x)
        assert torch.isfinite(outs[mode]).all()
    attn = model.layers[0].attention
    assert attn.q_norm.weight.shape == (4 * 8,) and attn.k_norm.weight.shape == (2 * 8,)
    assert not torch.allclose(outs["none"], outs["head"])
    assert not torch.allclose(outs["none"], outs["full"])
    assert not torch.allclose(outs["head"], outs["full"])


def test_rope_linear_scaling_equals_unscaled_at_divided_positions():
    factor = 4.0
    scaled = RotaryEmbedding(small_cfg(rope_scaling="linear", rope_scaling_factor=factor))
    plain = RotaryEmbedding(small_cfg())
    positions = torch.arange(20)
    for a, b in zip(scaled(positions), plain(positions / factor)):
        torch.testing.assert_close(a, b)


def test_init_is_deterministic_and_seed_dependent():
    def state(seed):
        torch.manual_seed(seed)
        return Transformer(small_cfg()).state_dict()

    a, b, c = state(0), state(0), state(1)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)
    assert any(not torch.equal(a[n], c[n]) for n in a if "weight" in n)


def test_meta_build_then_init_weights_equals_direct_build():
    cfg = small_cfg(tie_embeddings=True, qkv_bias=True, moe=dict(num_shared_experts=1))
    torch.manual_seed(4)
    direct = Transformer(cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(4)
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    for (name, p), q in zip(direct.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)


def test_init_std_and_residual_scaling():
    cfg = small_cfg(first_k_dense=1, num_layers=2, init_std=0.5, dense_hidden_dim=512)
    model = Transformer(cfg)
    out_std = 0.5 / math.sqrt(4)
    block = model.layers[0]
    assert block.attention.wq.weight.std().item() == pytest.approx(0.5, rel=0.1)
    assert block.feed_forward.w2.weight.std().item() == pytest.approx(out_std, rel=0.1)
    experts = model.moe_layers()[0].experts
    assert experts.w2_EDF.std().item() == pytest.approx(out_std, rel=0.1)
    assert torch.equal(block.attention_norm.weight, torch.ones(D))


@pytest.mark.parametrize(("first_k_dense", "freq", "expected"), [(1, 1, 2), (0, 2, 2), (3, 1, 0)])
def test_moe_layers_follow_placement(first_k_dense, freq, expected):
    model = Transformer(small_cfg(first_k_dense=first_k_dense, moe_layer_freq=freq))
    layers = model.moe_layers()
    assert len(layers) == expected
    assert [m.layer_idx for m in layers] == list(range(expected))


def test_param_accounting():
    moe = Transformer(small_cfg(moe=dict(num_shared_experts=1)))
    dense = Transformer(small_cfg(first_k_dense=3))
    tied = Transformer(small_cfg(first_k_dense=3, tie_embeddings=True))
    assert moe.num_active_params() < moe.num_params()
    assert dense.num_active_params() == dense.num_params()
    assert tied.num_params() == dense.num_params() - 64 * D
    # Per MoE layer, the 8 - 2 unselected experts of 3 * D * 24 parameters are inactive.
    assert moe.num_params() - moe.num_active_params() == 2 * 6 * 3 * D * 24
    attention = 12 * 3 * 4 * 8 * 16
    assert dense.flops_per_token(16) == 6 * (dense.num_params() - 64 * D) + attention
    assert tied.flops_per_token(16) == 6 * tied.num_params() + attention


def test_sgd_step_trains_and_fills_moe_stats():
    model = Transformer(small_cfg(moe=dict(aux_loss_coeff=0.01, z_loss_coeff=0.001)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = tokens(S=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = model(x[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    for name in ("tok_embeddings.weight", "output.weight", "norm.weight"):
        assert name in changed
    for i in range(3):
        assert f"layers.{i}.attention.wq.weight" in changed
    for i in (1, 2):  # the router learns through the combine weights and the aux losses
        assert f"layers.{i}.feed_forward.router.weight_ED" in changed
    for layer in model.moe_layers():
        stats = layer.last_stats
        assert stats is not None and stats.aux_loss > 0
        assert stats.tokens_per_expert_E.sum() == 2 * 15 * 2


def test_hash_router_receives_token_ids():
    model = small_model(moe=dict(router_type="hash", top_k=1))
    x = tokens()
    model(x)
    expected = torch.bincount(hash_token_ids(x.flatten()) % 8, minlength=8).float()
    for layer in model.moe_layers():
        assert isinstance(layer, MoELayer) and layer.last_stats is not None
        torch.testing.assert_close(layer.last_stats.tokens_per_expert_E, expected)


def test_too_long_sequence_names_the_setting():
    model = Transformer(small_cfg(max_seq_len=8))
    with pytest.raises(ValueError, match=r"model\.max_seq_len=8"):
        model(tokens(S=9))


def test_meta_build_of_a_large_model_allocates_nothing():
    cfg = ModelConfig(dim=4096, num_heads=32, num_kv_heads=8, num_layers=8, vocab_size=32000,
                      moe=MoEConfig(dim=4096, hidden_dim=14336))  # fmt: skip
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert model.num_params() > 10**9
