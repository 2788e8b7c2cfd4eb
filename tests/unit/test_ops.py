import os
import subprocess
import sys

import pytest
import torch

from moetrain.moe.dispatcher import Routing, TokenDispatcher
from moetrain.ops import permute, unpermute

# T=4 tokens; 6 rows, token 2 taken twice, token 3 never, two padding rows
ROW_TOKEN = torch.tensor([2, 0, -1, 2, 1, -1])
EMPTY = torch.zeros(0, dtype=torch.long)


def loop_permute(x, row_token):
    rows = torch.zeros(len(row_token), x.shape[1], dtype=x.dtype)
    for r, t in enumerate(row_token.tolist()):
        if t >= 0:
            rows[r] = x[t]
    return rows


def loop_unpermute(rows, row_token, weight, num_tokens):
    out = torch.zeros(num_tokens, rows.shape[1], dtype=torch.float64)
    for r, t in enumerate(row_token.tolist()):
        if t >= 0:
            out[t] += (1.0 if weight is None else float(weight[r])) * rows[r].double()
    return out


@pytest.mark.parametrize("row_token", [ROW_TOKEN, ROW_TOKEN.clamp(min=0), EMPTY], ids=str)
def test_opcheck_permute(row_token):
    x = torch.randn(4, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.moetrain.permute.default, (x, row_token))


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("row_token", [ROW_TOKEN, ROW_TOKEN.clamp(min=0), EMPTY], ids=str)
def test_opcheck_unpermute(row_token, with_weight):
    R = len(row_token)
    rows = torch.randn(R, 3, requires_grad=True)
    weight = torch.rand(R, requires_grad=True) if with_weight else None
    torch.library.opcheck(torch.ops.moetrain.unpermute.default, (rows, row_token, weight, 4))


def test_permute_values():
    x = torch.randn(4, 3)
    rows = permute(x, ROW_TOKEN)
    assert torch.equal(rows, loop_permute(x, ROW_TOKEN))
    assert rows[2].tolist() == [0.0] * 3
    assert permute(x, EMPTY).shape == (0, 3)


@pytest.mark.parametrize("with_weight", [True, False])
def test_unpermute_values(with_weight):
    rows = torch.randn(6, 3)
    weight = torch.rand(6) if with_weight else None
    y = unpermute(rows, ROW_TOKEN, weight, 4)
    assert y.shape == (4, 3) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), loop_unpermute(rows, ROW_TOKEN, weight, 4))
    assert y[3].tolist() == [0.0] * 3  # token 3 has no row
    assert torch.equal(unpermute(rows[:0], EMPTY, None, 4), torch.zeros(4, 3))


def test_gradcheck_permute():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: permute(x, ROW_TOKEN), (x,))
    # the second derivative runs through unpermute
    assert torch.autograd.gradgradcheck(lambda x: permute(x, ROW_TOKEN), (x,))


@pytest.mark.parametrize("with_weight", [True, False])
def test_gradcheck_unpermute(with_weight):
    rows = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(6, dtype=torch.float64, requires_grad=True) if with_weight else None
    inputs = (rows, weight) if with_weight else (rows,)

    def fn(rows, weight=None):
        return unpermute(rows, ROW_TOKEN, weight, 4)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_unpermute_keeps_float64_precision():
    rows = torch.tensor([[1.0 + 1e-12], [2.0**-40]], dtype=torch.float64)
    weight = torch.tensor([1.0, 1.0 + 2.0**-30], dtype=torch.float64)
    y = unpermute(rows, torch.tensor([0, 0]), weight, 1)
    assert y.dtype == torch.float64
    assert y.item() == (1.0 + 1e-12) + 2.0**-40 * (1.0 + 2.0**-30)


def test_unpermute_gradients_by_hand():
    rows = torch.randn(6, 3, requires_grad=True)
    weight = torch.rand(6, requires_grad=True)
    g = torch.randn(4, 3)
    grad_rows, grad_weight = torch.autograd.grad(
        (unpermute(rows, ROW_TOKEN, weight, 4) * g).sum(), (rows, weight)
    )
    for r, t in enumerate(ROW_TOKEN.tolist()):
        want_rows = weight[r].detach() * g[t] if t >= 0 else torch.zeros(3)
        want_weight = (g[t] * rows[r].detach()).sum() if t >= 0 else torch.tensor(0.0)
        torch.testing.assert_close(grad_rows[r], want_rows)
        torch.testing.assert_close(grad_weight[r], want_weight)


def test_unpermute_accumulates_bf16_in_fp32():
    # 256 + 1 is not a bf16 number: adding sixteen 1.0 rows one at a time in bf16 stays at 256
    rows = torch.tensor([[256.0]] + [[1.0]] * 16).bfloat16()
    row_token = torch.zeros(17, dtype=torch.long)
    y = unpermute(rows, row_token, torch.ones(17), 1)
    assert y.dtype == torch.bfloat16
    assert y.item() == 272.0
    # weighted: fp32 sum of fp32 weight times row, rounded once
    weight = torch.full((17,), 0.3)
    want = (rows.float() * weight.unsqueeze(-1)).sum(0).bfloat16()
    assert torch.equal(unpermute(rows, row_token, weight, 1)[0], want)


def test_unpermute_ignores_nonfinite_padding_rows():
    rows = torch.tensor([[1.0, 2.0], [float("nan"), float("inf")]])
    row_token = torch.tensor([0, -1])
    assert unpermute(rows, row_token, None, 1).tolist() == [[1.0, 2.0]]
    assert unpermute(rows, row_token, torch.tensor([0.5, 0.0]), 1).tolist() == [[0.5, 1.0]]


IDS = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
KEEP = torch.tensor([[True, True], [True, False], [False, True], [True, True], [True, False]])


def expected_rows(x, keep, pad):
    """Expert-major rows, token order inside each expert, zero rows padding up to ``pad``."""
    rows, counts = [], []
    for e in range(3):
        mine = [x[t] for t in range(5) for k in range(2) if IDS[t, k] == e and keep[t, k]]
        if pad:
            mine += [torch.zeros(4)] * (pad - len(mine))
        rows += mine
        counts.append(len(mine))
    return torch.stack(rows), counts


@pytest.mark.parametrize(
    ("keep", "pad"), [(None, None), (KEEP, None), (KEEP, 3)], ids=["dropless", "keep", "pad"]
)
def test_dispatch_combine_identity_experts(keep, pad):
    x = torch.randn(5, 4)
    weights = torch.rand(5, 2)
    dispatcher = TokenDispatcher(3)
    rows, counts = dispatcher.dispatch(x, Routing(IDS, weights, keep, pad))
    y = dispatcher.combine(rows)  # identity experts
    keep = torch.ones(5, 2, dtype=torch.bool) if keep is None else keep
    want = torch.zeros(5, 4)
    for t in range(5):
        for k in range(2):
            if keep[t, k]:
                want[t] += weights[t, k] * x[t]
    torch.testing.assert_close(y, want)
    want_rows, want_counts = expected_rows(x, keep, pad)
    assert counts.tolist() == want_counts
    assert torch.equal(rows, want_rows)


def test_dispatch_combine_gradients():
    x = torch.randn(5, 4, requires_grad=True)
    weights = torch.rand(5, 2, requires_grad=True)
    dispatcher = TokenDispatcher(3)
    rows, _ = dispatcher.dispatch(x, Routing(IDS, weights, KEEP))
    y = dispatcher.combine(rows)
    grad_x, grad_w = torch.autograd.grad(y.square().sum(), (x, weights))
    # y_t = s_t x_t with s_t the sum of t's kept weights
    s = (weights * KEEP).sum(-1, keepdim=True).detach()
    torch.testing.assert_close(grad_x, 2 * s**2 * x.detach())
    want_w = (2 * s * x.detach().square().sum(-1, keepdim=True)) * KEEP
    torch.testing.assert_close(grad_w, want_w)


def test_combine_before_dispatch_raises():
    dispatcher = TokenDispatcher(3)
    with pytest.raises(RuntimeError, match="dispatch"):
        dispatcher.combine(torch.zeros(0, 4))
    rows, _ = dispatcher.dispatch(torch.randn(5, 4), Routing(IDS, torch.rand(5, 2)))
    dispatcher.combine(rows)
    with pytest.raises(RuntimeError, match="dispatch"):
        dispatcher.combine(rows)


def test_pure_torch_fallback_is_reported():
    # without the extension the ops still run (the references), and active_backend() says so
    code = (
        "import torch\n"
        "from moetrain.ops import active_backend, permute\n"
        "print(active_backend())\n"
        "print(permute(torch.ones(2, 2), torch.tensor([1, -1])).tolist())\n"
    )
    env = {**os.environ, "MOETRAIN_NO_CSRC": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [
        "pure-torch reference (extension not built: disabled by MOETRAIN_NO_CSRC=1)",
        "[[1.0, 1.0], [0.0, 0.0]]",
    ]
