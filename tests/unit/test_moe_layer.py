"""The layer against the naive references in moetrain.moe.reference (output and gradients)."""

import pytest
import torch

from moetrain.moe.config import MoEConfig
from moetrain.moe.layer import MoELayer
from moetrain.moe.reference import reference_moe_per_expert, reference_moe_per_token

BASE = dict(num_experts=8, top_k=2, dim=8, hidden_dim=16, aux_loss_coeff=0.1)
CAPACITY = dict(capacity_factor=0.5, min_capacity=0)
CASES = {
    "softmax": dict(),
    "sigmoid": dict(score_func="sigmoid"),
    "capacity_probs": dict(CAPACITY, drop_policy="probs"),
    "capacity_position": dict(CAPACITY, drop_policy="position"),
    "pad_to_capacity": dict(CAPACITY, pad_to_capacity=True),
    "shared": dict(num_shared_experts=2),
    "shared_gate": dict(num_shared_experts=1, shared_gate=True, shared_hidden_dim=12),
    "groups": dict(num_groups=4, topk_groups=2),
    "gelu": dict(activation="gelu"),
    "logit_norm": dict(logit_norm_scale=1.0),
    "z_loss": dict(z_loss_coeff=0.01),
    "sequence_aux": dict(aux_loss_scope="sequence"),
}
SHAPES = {"flat": (16, 8), "batched": (2, 8, 8)}
PARAMS = [
    pytest.param(case, shape, id=f"{case}-{shape}")
    for case in CASES
    for shape in SHAPES
    if not (case == "sequence_aux" and shape == "flat")  # needs [B, S, D]
]


def make_layer(**kw):
    layer = MoELayer(MoEConfig(**{**BASE, **kw}))
    layer.reset_parameters(std=0.3)  # peaked routing, outputs well above the tolerance
    return layer


def grads(loss, layer, x):
    inputs = [x, *(p for p in layer.parameters())]
    return torch.autograd.grad(loss, inputs)


def assert_matches_reference(layer, x, reference=reference_moe_per_token, token_ids=None):
    g = torch.randn(x.shape)
    y = layer(x, token_ids=token_ids)
    got = grads((y * g).sum(), layer, x)
    y_ref, aux_ref = reference(layer, x, token_ids)
    want = grads((y_ref * g).sum() + aux_ref, layer, x)
    assert y.abs().max() > 1e-2
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("case", "shape"), PARAMS)
def test_layer_matches_per_token_reference(case, shape):
    layer = make_layer(**CASES[case])
    x = torch.randn(SHAPES[shape], requires_grad=True)
    assert_matches_reference(layer, x)
    if "capacity_factor" in CASES[case]:
        assert int(layer.last_stats.num_dropped) > 0
    if case == "sequence_aux":
        assert float(layer.last_stats.aux_loss) > 0


@pytest.mark.parametrize("case", list(CASES))
def test_grouped_mm_layer_matches_per_token_reference(case):
    """model.moe.experts_impl=grouped_mm against the naive per-token loop (the loop path is
    the test above: ``auto`` is the loop on CPU)."""
    layer = make_layer(**CASES[case], experts_impl="grouped_mm")
    x = torch.randn(SHAPES["batched"], requires_grad=True)
    assert_matches_reference(layer, x)


@pytest.mark.parametrize("case", ["softmax", "capacity_probs", "pad_to_capacity", "shared_gate"])
def test_per_expert_reference_equals_per_token(case):
    layer = make_layer(**CASES[case])
    x = torch.randn(2, 8, 8, requires_grad=True)
    y_tok, aux_tok = reference_moe_per_token(layer, x)
    y_exp, aux_exp = reference_moe_per_expert(layer, x)
    torch.testing.assert_close(y_exp, y_tok, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux_exp, aux_tok)
    g = torch.randn(x.shape)
    for a, b in zip(grads((y_exp * g).sum(), layer, x), grads((y_tok * g).sum(), layer, x)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router_type", ["random", "hash"])
def test_ablation_routers_in_eval(router_type):
    layer = make_layer(router_type=router_type).eval()
    x = torch.randn(2, 8, 8, requires_grad=True)
    token_ids = torch.randint(0, 50000, (2, 8))
    y = layer(x, token_ids=token_ids)
    y_ref, _ = reference_moe_per_token(layer, x, token_ids)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert float(layer.last_stats.aux_loss) == 0.0


def test_meta_device_init():
    cfg = MoEConfig(**BASE, num_shared_experts=1, shared_gate=True, bias_update_rate=0.01)
    with torch.device("meta"):
        layer = MoELayer(cfg)
    assert all(p.is_meta for p in layer.parameters())
    layer.to_empty(device="cpu")
    layer.reset_parameters(std=0.3)
    assert all(p.device.type == "cpu" for p in layer.parameters())
    assert layer.router.expert_bias_E.tolist() == [0.0] * 8
    assert layer.router.step_load_E.tolist() == [0.0] * 8
    x = torch.randn(2, 8, 8, requires_grad=True)
    assert_matches_reference(layer, x)


def test_bf16():
    layer = make_layer(num_shared_experts=1)
    x = torch.randn(2, 8, 8)
    layer_bf16 = make_layer(num_shared_experts=1).to(torch.bfloat16)
    layer_bf16.load_state_dict(layer.state_dict())
    y = layer_bf16(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    y.float().sum().backward()
    assert layer_bf16.experts.w1_EFD.grad.dtype == torch.bfloat16
    # the same layer in fp32 with the bf16-rounded weights and input
    layer.load_state_dict({k: v.float() for k, v in layer_bf16.state_dict().items()})
    y_ref, _ = reference_moe_per_token(layer, x.bfloat16().float())
    torch.testing.assert_close(y.float(), y_ref, atol=2e-2, rtol=2e-2)


def test_wrong_dim_raises():
    with pytest.raises(ValueError, match=r"model\.moe\.dim"):
        make_layer()(torch.randn(4, 6))


@pytest.mark.slow  # cold inductor compile of every graph piece: ~60 s on 2 cores
def test_torch_compile_matches_eager():
    layer = make_layer(**CAPACITY, num_shared_experts=1)
    x = torch.randn(16, 8, requires_grad=True)
    g = torch.randn(16, 8)
    y = layer(x)
    want = grads((y * g).sum(), layer, x)
    y_c = torch.compile(layer)(x)
    got = grads((y_c * g).sum(), layer, x)
    torch.testing.assert_close(y_c, y, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mixed_dtype_input_is_a_clear_error():
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, dim=8, hidden_dim=16))
    with pytest.raises(ValueError, match=r"layer\.to\(dtype\).*autocast"):
        layer(torch.randn(5, 8, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(5, 8, dtype=torch.bfloat16)).shape == (5, 8)
