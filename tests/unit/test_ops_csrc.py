"""The compiled csrc kernels against the pure-torch references, forward and backward.

Both sides run through the same autograd and fake registrations: the csrc side is the op as
imported, the reference side the same op inside ``moetrain.ops.reference_kernels()``. The kernels
sum in the reference's order with the reference's roundings, so every comparison on CPU is
bit-exact (``torch.equal``), fp32 and bf16 included.

One exception: the weight gradient of ``unpermute`` (``unpermute_backward``'s second output) is a
row-wise dot product, which the kernels sum in vector lanes and the reference's einsum sums in
MKL's order; it is checked within the rounding error bound of an fp32 dot product,
``2 * D * eps * sum_d |g_d * x_d|`` (each side within half of it of the exact value).

The extension must be built: if it is missing or fails to load these tests FAIL, so a broken
build cannot pass CI. ``MOETRAIN_NO_CSRC=1`` (a deliberate run without the extension) skips them.
"""

from __future__ import annotations

import pytest
import torch

from moetrain.moe import MoEConfig, MoELayer
from moetrain.moe.capacity import capacity_keep_mask
from moetrain.moe.dispatcher import ExpertRows, Routing, sort_by_expert
from moetrain.ops import (
    active_backend,
    expert_sort,
    extension_error,
    permute,
    reference_kernels,
    unpermute,
)
from moetrain.ops.backend import csrc_disabled
from moetrain.ops.permute import permute_reference, unpermute_reference
from moetrain.ops.sort import expert_sort_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16]


@pytest.fixture(autouse=True)
def _require_extension():
    if csrc_disabled():
        pytest.skip("MOETRAIN_NO_CSRC=1: running without the csrc extension")
    reason = extension_error()
    if reason is not None:
        pytest.fail(f"csrc extension not loaded ({reason}); MOETRAIN_NO_CSRC=1 tests without it")


def routed(
    num_tokens: int, num_experts: int, top_k: int, capacity: int | None = None, pad: bool = False
) -> ExpertRows:
    """Expert rows as the dispatcher builds them, from a very uneven routing: expert e is drawn
    with weight exp(-3e / E), and the last quarter of the experts never."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.exp(-3.0 * torch.arange(num_experts) / num_experts)
    weights[-num_experts // 4 :] = 0
    ids = torch.stack([torch.multinomial(weights, top_k, generator=gen) for _ in range(num_tokens)])
    probs = torch.rand(ids.shape, generator=gen)
    keep = None
    if capacity is not None:
        keep = capacity_keep_mask(ids, probs, num_experts, capacity, "probs")
    return sort_by_expert(Routing(ids, probs, keep, capacity if pad else None), num_experts)


UNEVEN, DROPPED, PADDED = routed(48, 16, 4), routed(48, 16, 4, 6), routed(48, 16, 4, 6, pad=True)
assert (UNEVEN.tokens_per_expert_E[-4:] == 0).all()  # empty experts
assert UNEVEN.tokens_per_expert_E.max() > 4 * UNEVEN.tokens_per_expert_E[:12].min()  # uneven
assert len(DROPPED.row_token_R) < 48 * 4 and (PADDED.row_token_R == -1).any()

# (num_tokens T, row_token_R): every edge the dispatcher can produce, and a few it cannot
CASES = {
    "uneven": (48, UNEVEN.row_token_R),
    "dropped": (48, DROPPED.row_token_R),
    "padded": (48, PADDED.row_token_R),
    "all_dropped": (7, torch.zeros(0, dtype=torch.long)),
    "no_tokens": (0, torch.zeros(0, dtype=torch.long)),
    "only_padding": (3, torch.full((5,), -1)),
    "unreferenced_tokens": (50, torch.tensor([3, 0, 3, 9, -1, 0, 3, 3])),
    "one_token_many_rows": (2, torch.ones(40, dtype=torch.long)),
}


def _data(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _run_permute(x, row_token, grad_rows):
    x = x.detach().requires_grad_(True)
    rows = permute(x, row_token)
    (grad_x,) = torch.autograd.grad(rows, x, grad_rows)
    return rows, grad_x


def _run_unpermute(rows, row_token, weight, num_tokens, grad_out):
    rows = rows.detach().requires_grad_(True)
    inputs = [rows]
    if weight is not None:
        weight = weight.detach().requires_grad_(True)
        inputs.append(weight)
    y = unpermute(rows, row_token, weight, num_tokens)
    return (y, *torch.autograd.grad(y, inputs, grad_out))


def assert_same(got: tuple, want: tuple) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w), f"max abs diff {(g.double() - w.double()).abs().max()}"


def assert_weight_grad_close(got, want, grad_out, rows, row_token):
    """Within the fp32 (opmath) dot-product bound of each other, plus the final rounding to the
    weight's dtype; padding rows exactly 0."""
    acc_eps = torch.finfo(torch.promote_types(rows.dtype, torch.float32)).eps
    out_eps = torch.finfo(got.dtype).eps
    gathered = permute_reference(grad_out.double(), row_token)
    magnitude = (gathered.abs() * rows.double().abs()).sum(-1)
    bound = (2 * rows.shape[-1] * acc_eps + 2 * out_eps) * magnitude
    assert ((got.double() - want.double()).abs() <= bound).all()
    assert (got[row_token < 0] == 0).all()


def test_active_backend_reports_csrc():
    assert active_backend().startswith(f"csrc (C++ CPU, OpenMP {torch.get_num_threads()} thread")
    with reference_kernels():
        y = permute(torch.ones(2, 3), torch.tensor([1]))
    assert torch.equal(y, torch.ones(1, 3))


@pytest.mark.parametrize("dim", [1, 3, 64, 67])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_permute_matches_reference(case, dtype, dim):
    num_tokens, row_token = CASES[case]
    x = _data((num_tokens, dim), dtype)
    grad_rows = _data((len(row_token), dim), dtype, seed=2)
    got = _run_permute(x, row_token, grad_rows)
    with reference_kernels():
        want = _run_permute(x, row_token, grad_rows)
    assert_same(got, want)
    assert torch.equal(got[0], permute_reference(x, row_token))


@pytest.mark.parametrize("with_weight", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize("dim", [1, 3, 64, 67])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_unpermute_matches_reference(case, dtype, dim, with_weight):
    num_tokens, row_token = CASES[case]
    R = len(row_token)
    rows = _data((R, dim), dtype)
    weight = _data((R,), torch.float32, seed=3).abs() if with_weight else None
    grad_out = _data((num_tokens, dim), dtype, seed=4)
    got = _run_unpermute(rows, row_token, weight, num_tokens, grad_out)
    with reference_kernels():
        want = _run_unpermute(rows, row_token, weight, num_tokens, grad_out)
    assert_same(got[:2], want[:2])  # output and rows gradient: bit-identical
    assert torch.equal(got[0], unpermute_reference(rows, row_token, weight, num_tokens))
    if with_weight:
        assert_weight_grad_close(got[2], want[2], grad_out, rows, row_token)


def test_unpermute_weight_dtype_and_nonfinite_padding():
    # bf16 rows with fp64 weights (cast to the fp32 accumulator, as the reference does); NaN and
    # Inf in padding rows are ignored
    row_token = torch.tensor([1, -1, 1, 0, -1])
    rows = _data((5, 9), torch.bfloat16)
    rows[1] = float("nan")
    rows[4] = float("inf")
    weight = _data((5,), torch.float64, seed=5)
    got = unpermute(rows, row_token, weight, 3)
    assert torch.equal(got, unpermute_reference(rows, row_token, weight, 3))
    assert got.isfinite().all()


def test_noncontiguous_inputs_and_int32_indices():
    x = _data((16, 6), torch.float32).t()  # [6, 16], not contiguous
    row_token = torch.tensor([5, -1, 0, 5, 2], dtype=torch.int32)
    assert torch.equal(permute(x, row_token), permute_reference(x, row_token))
    rows = _data((16, 5), torch.float32).t()
    weight = _data((10,), torch.float32)[::2]
    assert torch.equal(
        unpermute(rows, row_token, weight, 6), unpermute_reference(rows, row_token, weight, 6)
    )


def test_out_of_range_tokens_raise():
    with pytest.raises(RuntimeError, match="out of range"):
        permute(torch.zeros(3, 2), torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="out of range"):
        unpermute(torch.zeros(2, 2), torch.tensor([0, 3]), None, 3)
    with pytest.raises(RuntimeError, match="entries for"):
        unpermute(torch.zeros(2, 2), torch.tensor([0]), None, 3)


def test_unpermute_backward_op():
    num_tokens, row_token = CASES["padded"]
    R, D = len(row_token), 40
    grad_out, rows = _data((num_tokens, D), torch.float32), _data((R, D), torch.float32, seed=2)
    rows[row_token < 0] = float("nan")  # padding rows are ignored, whatever they hold
    weight = _data((R,), torch.float32, seed=3)
    grad_rows, grad_weight = torch.ops.moetrain.unpermute_backward(
        grad_out, rows, row_token, weight
    )
    with reference_kernels():
        want_rows, want_weight = torch.ops.moetrain.unpermute_backward(
            grad_out, rows, row_token, weight
        )
    assert torch.equal(grad_rows, want_rows)
    assert_weight_grad_close(grad_weight, want_weight, grad_out, rows.nan_to_num(), row_token)
    torch.library.opcheck(
        torch.ops.moetrain.unpermute_backward.default, (grad_out, rows, row_token, weight)
    )


@pytest.mark.parametrize("case", ["uneven", "padded", "all_dropped", "no_tokens"])
def test_opcheck_csrc(case):
    num_tokens, row_token = CASES[case]
    x = torch.randn(num_tokens, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.moetrain.permute.default, (x, row_token))
    rows = torch.randn(len(row_token), 5, requires_grad=True)
    weight = torch.rand(len(row_token), requires_grad=True)
    torch.library.opcheck(
        torch.ops.moetrain.unpermute.default, (rows, row_token, weight, num_tokens)
    )


def test_gradgradcheck_through_csrc():
    num_tokens, row_token = CASES["padded"]
    rows = torch.randn(len(row_token), 3, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(len(row_token), dtype=torch.float64, requires_grad=True)

    def fn(rows, weight):
        return unpermute(rows, row_token, weight, num_tokens)

    assert torch.autograd.gradgradcheck(fn, (rows, weight))


@pytest.mark.parametrize(
    "options",
    [
        dict(num_experts=8, top_k=2),
        dict(num_experts=16, top_k=4, capacity_factor=1.0),
        dict(num_experts=16, top_k=4, capacity_factor=1.0, pad_to_capacity=True),
    ],
    ids=["dropless", "capacity", "pad_to_capacity"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_moe_layer_csrc_equals_reference_ops(options, dtype):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=32, hidden_dim=16, **options)).to(dtype)
    x = torch.randn(3, 10, 32, dtype=dtype)
    g = torch.randn(3, 10, 32, dtype=dtype)

    def run():
        layer.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        y = layer(xr)
        y.backward(g)
        return (y, xr.grad, *(p.grad for p in layer.parameters()))

    got = run()
    with reference_kernels():
        want = run()
    assert_same(got[:1], want[:1])  # the forward: bit-identical
    # Gradients reach the router through the weight gradient (a dot product summed in another
    # order, see the module docstring): equal within fp32 rounding, carried through the
    # layer in bf16 for the bf16 layer.
    for g, w in zip(got[1:], want[1:], strict=True):
        tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g, w, **tol)


SORT_CASES = {
    "uneven": (torch.arange(16).repeat_interleave(UNEVEN.tokens_per_expert_E), 16),
    "empty": (torch.zeros(0, dtype=torch.long), 8),
    "one_bin": (torch.full((100,), 3), 5),
    "no_bins": (torch.zeros(0, dtype=torch.long), 0),
    "random_large": (
        torch.randint(0, 65, (70_000,), generator=torch.Generator().manual_seed(0)),
        65,
    ),
    "int32": (torch.tensor([2, 0, 2, 1, 0], dtype=torch.int32), 3),
}


@pytest.mark.parametrize("case", SORT_CASES)
def test_expert_sort_matches_reference(case):
    ids, num_bins = SORT_CASES[case]
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))]  # shuffled
    got = expert_sort(ids, num_bins)
    want = expert_sort_reference(ids, num_bins)
    assert_same(got, want)  # a stable sort is unique: exact
    torch.library.opcheck(torch.ops.moetrain.expert_sort.default, (ids, num_bins))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_expert_sort_independent_of_threads(threads):
    ids, num_bins = SORT_CASES["random_large"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the chunking follows the thread count; the result must not
    try:
        assert_same(expert_sort(ids, num_bins), expert_sort_reference(ids, num_bins))
    finally:
        torch.set_num_threads(before)


def test_expert_sort_rejects_out_of_range_ids():
    with pytest.raises(RuntimeError, match="outside"):
        expert_sort(torch.tensor([0, 4]), 4)
    with pytest.raises(RuntimeError, match="outside"):
        expert_sort(torch.tensor([-1]), 4)


# --- CUDA: the same comparisons on the device (skipped where there is no CUDA) ---------------


@pytest.mark.gpu
def test_active_backend_reports_csrc_cuda():
    assert active_backend("CUDA").startswith("csrc (CUDA; self-check passed")


@pytest.mark.gpu
@pytest.mark.parametrize("with_weight", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_cuda_kernels_match_reference(case, dtype, with_weight):
    # Against the CPU reference: the CUDA kernels add in row order with separately rounded
    # multiplies and adds, as the CPU reference does, so all but the weight gradient are
    # bit-identical (torch's CUDA index_add_ adds in any order, with atomics).
    num_tokens, row_token = CASES[case]
    dim = 67  # not a multiple of the 16-byte copy unit: the narrower copy paths run too
    R = len(row_token)
    x = _data((num_tokens, dim), dtype)
    rows = _data((R, dim), dtype, seed=2)
    weight = _data((R,), torch.float32, seed=3) if with_weight else None
    grad_out = _data((num_tokens, dim), dtype, seed=4)
    with reference_kernels():
        want_p = _run_permute(x, row_token, rows)
        want_u = _run_unpermute(rows, row_token, weight, num_tokens, grad_out)

    def cuda(t):
        return None if t is None else t.cuda()

    got_p = _run_permute(x.cuda(), row_token.cuda(), rows.cuda())
    got_u = _run_unpermute(cuda(rows), row_token.cuda(), cuda(weight), num_tokens, grad_out.cuda())
    assert_same(tuple(t.cpu() for t in got_p), want_p)
    assert_same(tuple(t.cpu() for t in got_u[:2]), want_u[:2])
    if with_weight:
        assert_weight_grad_close(got_u[2].cpu(), want_u[2], grad_out, rows, row_token)


@pytest.mark.gpu
@pytest.mark.parametrize("case", SORT_CASES)
def test_cuda_expert_sort_matches_reference(case):
    ids, num_bins = SORT_CASES[case]
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))]
    got = expert_sort(ids.cuda(), num_bins)
    assert_same(tuple(t.cpu() for t in got), expert_sort_reference(ids, num_bins))


@pytest.mark.gpu
def test_cuda_expert_sort_many_bins():
    # above the shared-memory bin limit the launcher falls back to ATen's sort and bincount
    ids = torch.randint(0, 10_000, (50_000,), generator=torch.Generator().manual_seed(2))
    got = expert_sort(ids.cuda(), 10_000)
    assert_same(tuple(t.cpu() for t in got), expert_sort_reference(ids, 10_000))


@pytest.mark.gpu
def test_cuda_opcheck():
    num_tokens, row_token = CASES["padded"]
    row_token = row_token.cuda()
    x = torch.randn(num_tokens, 5, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.moetrain.permute.default, (x, row_token))
    rows = torch.randn(len(row_token), 5, device="cuda", requires_grad=True)
    weight = torch.rand(len(row_token), device="cuda", requires_grad=True)
    torch.library.opcheck(
        torch.ops.moetrain.unpermute.default, (rows, row_token, weight, num_tokens)
    )
