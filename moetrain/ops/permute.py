"""Token permutation ops: tokens -> expert-sorted rows (permute) and back (unpermute/combine).

Legend: T tokens, D model dim, R rows (token-expert assignments kept, in expert order, plus any
padding rows). ``row_token_R[r]`` is the token row r was taken from, or -1 for a padding row.

Both ops live in the ``moetrain`` op namespace. The pure-torch reference below is registered as
the ``CompositeExplicitAutograd`` kernel; compiled kernels registered later with
``TORCH_LIBRARY_IMPL(moetrain, CPU|CUDA, ...)`` take precedence for their device and must keep
these schemas. Autograd and fake (meta) kernels are registered here, once for every backend.
The public wrappers (and unpermute's backward) run the compiled kernels' first-use self-check
(``moetrain.ops.selfcheck``) before the op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from moetrain.ops.selfcheck import ensure_checked

_LIB = torch.library.Library("moetrain", "DEF")
_LIB.define("permute(Tensor x, Tensor row_token) -> Tensor")
_LIB.define(
    "unpermute(Tensor rows, Tensor row_token, Tensor? row_weight, SymInt num_tokens) -> Tensor"
)
# unpermute's two gradients in one pass (its backward when no double backward is needed)
_LIB.define(
    "unpermute_backward(Tensor grad_out, Tensor rows, Tensor row_token, Tensor row_weight)"
    " -> (Tensor, Tensor)"
)


# --- pure-torch references (also the fallback when no compiled kernel is registered) ---------


def permute_reference(x_TD: Tensor, row_token_R: Tensor) -> Tensor:
    """``rows_RD[r] = x_TD[row_token_R[r]]``; padding rows (-1) are zero."""
    pad = row_token_R < 0
    rows = x_TD.index_select(0, row_token_R.clamp(min=0))
    # unconditionally: testing for padding first (``pad.any()``) would be a host sync on a GPU
    return rows.masked_fill(pad.unsqueeze(-1), 0)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # at least fp32 for the accumulation (bf16/fp16 rows); fp64 stays fp64
    return torch.promote_types(dtype, torch.float32)


def unpermute_reference(
    rows_RD: Tensor, row_token_R: Tensor, row_weight_R: Tensor | None, num_tokens: int
) -> Tensor:
    """``y_TD[t] = sum over rows r of token t of row_weight_R[r] * rows_RD[r]``.

    Accumulates in at least fp32 and returns ``rows_RD.dtype``. Padding rows (-1) are ignored,
    whatever they hold.
    """
    acc = _acc_dtype(rows_RD.dtype)
    src = rows_RD.to(acc)
    if row_weight_R is not None:
        src = src * row_weight_R.to(acc).unsqueeze(-1)
    pad = row_token_R < 0
    # where(), not a product: it also drops NaN/Inf in padding rows; unconditionally, as testing
    # for padding first would be a host sync on a GPU
    src = torch.where(pad.unsqueeze(-1), 0, src)
    out = torch.zeros(num_tokens, rows_RD.shape[-1], dtype=acc, device=rows_RD.device)
    out.index_add_(0, row_token_R.clamp(min=0), src)
    return out.to(rows_RD.dtype)


def unpermute_backward_reference(
    grad_out_TD: Tensor, rows_RD: Tensor, row_token_R: Tensor, row_weight_R: Tensor
) -> tuple[Tensor, Tensor]:
    """Both gradients of the weighted unpermute: ``grad_rows_RD[r] = w_r * g[token(r)]`` (in
    ``rows_RD.dtype``) and ``grad_weight_R[r] = <g[token(r)], rows_RD[r]>`` (in the weight's
    dtype), computed in at least fp32; both 0 for padding rows, whatever they hold."""
    gathered = permute_reference(grad_out_TD, row_token_R)
    acc = _acc_dtype(rows_RD.dtype)
    # row-wise dot products without an [R, D] temporary (einsum runs them as one bmm)
    grad_weight = torch.einsum("rd,rd->r", gathered.to(acc), rows_RD.to(acc))
    grad_weight = torch.where(row_token_R < 0, 0, grad_weight).to(row_weight_R.dtype)
    grad_rows = (gathered.to(acc) * row_weight_R.to(acc).unsqueeze(-1)).to(rows_RD.dtype)
    return grad_rows, grad_weight


# op name -> reference; also what ``moetrain.ops.reference_kernels()`` swaps in for a device
REFERENCES: dict[str, Callable[..., Any]] = {
    "permute": permute_reference,
    "unpermute": unpermute_reference,
    "unpermute_backward": unpermute_backward_reference,
}
for _name, _reference in REFERENCES.items():
    _LIB.impl(_name, _reference, "CompositeExplicitAutograd")


# --- fake (meta) kernels: shapes only --------------------------------------------------------


@torch.library.register_fake("moetrain::permute")
def _permute_fake(x: Tensor, row_token: Tensor) -> Tensor:
    return x.new_empty(row_token.shape[0], x.shape[-1])


@torch.library.register_fake("moetrain::unpermute")
def _unpermute_fake(
    rows: Tensor, row_token: Tensor, row_weight: Tensor | None, num_tokens: int
) -> Tensor:
    return rows.new_empty(num_tokens, rows.shape[-1])


@torch.library.register_fake("moetrain::unpermute_backward")
def _unpermute_backward_fake(
    grad_out: Tensor, rows: Tensor, row_token: Tensor, row_weight: Tensor
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(rows), torch.empty_like(row_weight)


# --- autograd: each op's backward is expressed with the other ops -----------------------------


def _permute_setup(ctx, inputs, output) -> None:
    x, row_token = inputs
    ctx.save_for_backward(row_token)
    ctx.num_tokens = x.shape[0]


def _permute_backward(ctx, grad_rows):
    (row_token,) = ctx.saved_tensors
    return torch.ops.moetrain.unpermute(grad_rows, row_token, None, ctx.num_tokens), None


def _unpermute_setup(ctx, inputs, output) -> None:
    rows, row_token, row_weight, _ = inputs
    ctx.save_for_backward(rows, row_token, row_weight)


def _unpermute_backward(ctx, grad_out):
    # d/drows = w * g[token(r)] and d/dw_r = <g[token(r)], rows_r>.
    rows, row_token, row_weight = ctx.saved_tensors
    # the forward may have been called as torch.ops.moetrain.unpermute, past the wrappers' check
    ensure_checked(grad_out)
    needs_rows = ctx.needs_input_grad[0]
    needs_weight = row_weight is not None and ctx.needs_input_grad[2]
    if not (needs_rows or needs_weight):
        return None, None, None, None
    if row_weight is not None and not torch.is_grad_enabled():
        # A first-order backward (grad mode off): both gradients in one fused pass.
        grad_rows, grad_weight = torch.ops.moetrain.unpermute_backward(
            grad_out, rows, row_token, row_weight
        )
        return grad_rows if needs_rows else None, None, grad_weight if needs_weight else None, None
    # Double backward (create_graph): one gather of grad_out serves both gradients, in
    # differentiable ops.
    gathered = torch.ops.moetrain.permute(grad_out, row_token)
    acc = _acc_dtype(rows.dtype)
    grad_rows = grad_weight = None
    if needs_weight:
        # row-wise dot products without an [R, D] temporary (einsum runs them as one bmm)
        grad_weight = torch.einsum("rd,rd->r", gathered.to(acc), rows.to(acc)).to(row_weight.dtype)
    if needs_rows:
        grad_rows = gathered
        if row_weight is not None:
            grad_rows = (gathered.to(acc) * row_weight.to(acc).unsqueeze(-1)).to(rows.dtype)
    return grad_rows, None, grad_weight, None


torch.library.register_autograd(
    "moetrain::permute", _permute_backward, setup_context=_permute_setup
)

torch.library.register_autograd(
    "moetrain::unpermute", _unpermute_backward, setup_context=_unpermute_setup
)


def permute(x_TD: Tensor, row_token_R: Tensor) -> Tensor:
    """Gather token rows into expert order. Args: ``x_TD`` [T, D]; ``row_token_R`` int64 [R]
    (-1 = padding row). Returns ``rows_RD`` [R, D]; its gradient scatter-adds back to tokens."""
    ensure_checked(x_TD)
    return torch.ops.moetrain.permute(x_TD, row_token_R)


def unpermute(
    rows_RD: Tensor, row_token_R: Tensor, row_weight_R: Tensor | None, num_tokens: int
) -> Tensor:
    """Weighted scatter-add of expert rows back to tokens (the combine step).

    Args: ``rows_RD`` [R, D]; ``row_token_R`` int64 [R] (-1 = padding, ignored); ``row_weight_R``
    [R] router weights or None (weight 1); ``num_tokens`` T. Returns ``y_TD`` [T, D] in
    ``rows_RD.dtype``, accumulated in fp32. Differentiable w.r.t. rows and weights.
    """
    ensure_checked(rows_RD)
    return torch.ops.moetrain.unpermute(rows_RD, row_token_R, row_weight_R, num_tokens)
