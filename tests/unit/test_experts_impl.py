"""model.moe.experts_impl: the grouped_mm path equals the per-expert loop (and through the layer
tests, the naive references), output and every gradient, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from moetrain.moe.config import MoEConfig
from moetrain.moe.experts import grouped_mlp, resolve_experts_impl
from moetrain.moe.layer import MoELayer

COUNTS = {
    "uneven": [3, 0, 5, 2],
    "one_busy_expert": [0, 7, 0, 0],
    "no_rows": [0, 0, 0, 0],
    "even": [4, 4, 4, 4],
    "single_expert": [9],
    "many_empty": [0, 1, 0, 0, 6, 0, 0, 2],
}
# fp32: both paths run the same products in another order; bf16: both round each GEMM's output
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def run_impl(impl, x, counts, weights, grad_out):
    x = x.clone().requires_grad_(True)
    ws = [None if w is None else w.clone().requires_grad_(True) for w in weights]
    y = grouped_mlp(x, counts, *ws, impl=impl)
    y.backward(grad_out)
    return [y, x.grad, *(None if w is None else w.grad for w in ws)]


def problem(counts, dtype, swiglu=True, D=16, F=8):
    gen = torch.Generator().manual_seed(sum(counts) + len(counts))
    E, R = len(counts), sum(counts)
    x = torch.randn(R, D, generator=gen).to(dtype)
    w1 = torch.randn(E, F, D, generator=gen).to(dtype)
    w3 = torch.randn(E, F, D, generator=gen).to(dtype) if swiglu else None
    w2 = torch.randn(E, D, F, generator=gen).to(dtype)
    g = torch.randn(R, D, generator=gen).to(dtype)
    return x, torch.tensor(counts), (w1, w3, w2), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(COUNTS))
@pytest.mark.parametrize("swiglu", [True, False], ids=["swiglu", "gelu"])
def test_grouped_mm_equals_loop(case, dtype, swiglu):
    x, counts, weights, g = problem(COUNTS[case], dtype, swiglu)
    loop = run_impl("loop", x, counts, weights, g)
    grouped = run_impl("grouped_mm", x, counts, weights, g)
    for name, a, b in zip(["y", "x", "w1", "w3", "w2"], grouped, loop):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype == dtype, name
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")
    if sum(COUNTS[case]):
        assert loop[0].abs().max() > 1e-2  # a real output, not zeros on both sides


def test_grouped_mm_takes_a_stride_zero_gradient():
    """``y.sum().backward()`` hands grouped_mm's backward an expanded (stride-0) gradient, which
    the kernel rejects unless it is made contiguous first."""
    x, counts, weights, _ = problem([2, 3, 1], torch.float32)
    x.requires_grad_(True)
    grouped_mlp(x, counts, *weights, impl="grouped_mm").sum().backward()
    x_loop = x.detach().clone().requires_grad_(True)
    grouped_mlp(x_loop, counts, *weights, impl="loop").sum().backward()
    torch.testing.assert_close(x.grad, x_loop.grad, rtol=1e-5, atol=1e-5)


def test_grouped_mm_under_autocast_computes_in_bf16_like_the_loop():
    x, counts, weights, g = problem([3, 0, 5, 2], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouped = run_impl("grouped_mm", x, counts, weights, g)
        loop = run_impl("loop", x, counts, weights, g)
    assert grouped[0].dtype == loop[0].dtype == torch.bfloat16
    for a, b in zip(grouped, loop):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    assert grouped[2].dtype == torch.float32  # weight gradients in the parameters' dtype


def test_grouped_mm_with_no_rows_returns_the_compute_dtype():
    """A rank whose experts got no rows must hand back rows in the dtype the others compute in
    (its combine exchange is built from them)."""
    _, counts, weights, _ = problem([0, 0, 0], torch.float32)
    empty = torch.zeros(0, 16, dtype=torch.bfloat16)
    assert grouped_mlp(empty, counts, *weights, impl="grouped_mm").dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = grouped_mlp(empty.float(), counts, *weights, impl="grouped_mm")
    assert out.dtype == torch.bfloat16 and out.shape == (0, 16)


def test_meta_tensors_take_either_path():
    w = [torch.empty(2, 8, 16, device="meta"), None, torch.empty(2, 16, 8, device="meta")]
    x = torch.empty(4, 16, device="meta")
    assert grouped_mlp(x, torch.tensor([1, 3]), *w, impl="auto").shape == (4, 16)


def test_counts_for_the_wrong_number_of_experts_raise():
    x, _, weights, _ = problem([2, 2], torch.float32)
    with pytest.raises(ValueError, match="row counts of shape"):
        grouped_mlp(x, torch.tensor([1, 1, 2]), *weights, impl="grouped_mm")


def test_auto_resolves_per_device():
    assert resolve_experts_impl("auto", torch.device("cpu")) == "loop"
    assert resolve_experts_impl("auto", torch.device("cuda", 0)) == "grouped_mm"
    # where the CUDA kernel cannot run, auto takes the loop instead of failing
    assert resolve_experts_impl("auto", torch.device("cuda"), torch.float32) == "loop"
    assert resolve_experts_impl("auto", torch.device("cuda"), torch.bfloat16, 12, 8) == "loop"
    assert resolve_experts_impl("grouped_mm", torch.device("cpu")) == "grouped_mm"
    assert resolve_experts_impl("loop", torch.device("cuda")) == "loop"


def test_unknown_experts_impl_is_rejected():
    with pytest.raises(ValueError, match="experts_impl"):
        MoEConfig(experts_impl="triton")


LAYER_CASES = {
    "dropless": {},
    "capacity": dict(capacity_factor=0.5, min_capacity=0),
    "padded": dict(capacity_factor=0.5, min_capacity=0, pad_to_capacity=True),
    "shared": dict(num_shared_experts=1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_with_grouped_mm_equals_loop(case, dtype):
    results = []
    for impl in ("loop", "grouped_mm"):
        torch.manual_seed(0)
        cfg = MoEConfig(num_experts=8, top_k=2, dim=16, hidden_dim=8, experts_impl=impl)
        layer = MoELayer(MoEConfig(**{**cfg.__dict__, **LAYER_CASES[case]})).to(dtype)
        layer.reset_parameters(std=0.3)
        x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
        x.requires_grad_(True)
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y).to(dtype)).sum().backward()
        results.append([y, x.grad, *(p.grad for p in layer.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_mm_on_cuda_equals_loop_in_bf16():
    for case in COUNTS:
        x, counts, weights, g = problem(COUNTS[case], torch.bfloat16, D=64, F=32)
        cuda = [t.cuda() if t is not None else None for t in (x, counts, *weights, g)]
        x_c, counts_c, w1, w3, w2, g_c = cuda
        grouped = run_impl("grouped_mm", x_c, counts_c, (w1, w3, w2), g_c)
        loop = run_impl("loop", x_c, counts_c.cpu(), (w1, w3, w2), g_c)
        for a, b in zip(grouped, loop):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_mm_on_cuda_rejects_fp32_with_the_key_to_change():
    x, counts, weights, _ = problem([2, 3], torch.float32)
    with pytest.raises(ValueError, match="experts_impl=grouped_mm on CUDA computes in bf16"):
        grouped_mlp(x.cuda(), counts.cuda(), *(w.cuda() for w in weights), impl="grouped_mm")
