"""Auxiliary router losses and how they reach the gradient.

Legend: T tokens, B sequences, S sequence length, E experts, K top-k.

Every loss is computed in fp32 whatever the dtype of its inputs or an enclosing autocast
(``train.dtype=bf16``): the router hands over fp32 logits and probabilities, and the reductions
here stay in fp32.

Losses are attached to the layer output through autograd (``attach_aux_loss``): the forward
value of the output is unchanged, and backward adds ``scale * d(aux)/d(params)``. No module-level
lists or globals: the trainer only backpropagates its language-model loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CountReduce = Callable[[Tensor], Tensor]
BalanceTerms = Callable[[Tensor, Tensor], Tensor]  # (f [..., E], P [..., E]) -> sum_i f_i P_i


def _plain_terms(f: Tensor, P: Tensor) -> Tensor:
    return (f * P).sum(-1)


def expert_counts(topk_ids_TK: Tensor, num_experts: int, keep_TK: Tensor | None = None) -> Tensor:
    """Assignments per expert, fp32 [E]: all of them, or with ``keep_TK`` only the kept ones
    (after capacity dropping); ids must be in ``[0, num_experts)``."""
    # scatter_add, not bincount: bincount's output length depends on the ids' values, a graph
    # break under torch.compile; counting in int64 keeps counts above 2**24 exact until the cast.
    # A mask, not ids[keep_TK]: boolean indexing reads the kept count on the host (a GPU sync)
    ids = topk_ids_TK.flatten()
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    ones = torch.ones_like(ids) if keep_TK is None else keep_TK.flatten().long()
    return counts_E.scatter_add_(0, ids, ones).float()


def load_balancing_loss(
    probs_TE: Tensor,
    topk_ids_TK: Tensor,
    coeff: float,
    scope: str = "micro_batch",
    seq_len: int | None = None,
    counts_E: Tensor | None = None,
    active_TK: Tensor | None = None,
    terms: BalanceTerms = _plain_terms,
) -> Tensor:
    """Switch/GShard balance loss ``coeff * E * sum_i f_i * P_i``.

    ``f_i`` is expert i's share of the T*K assignments (not differentiable; with ``active_TK``
    of the active ones only), ``P_i`` the mean router probability of i. ``terms`` computes the
    sum (routing options weigh or pool experts: ``moetrain.moe.routes.balance_terms``). Scopes:

    - ``micro_batch``: f and P over the T tokens of this call.
    - ``sequence``: f and P per sequence of ``seq_len`` tokens (rows of T are sequence-major),
      then averaged over the sequences (DeepSeek-V3's sequence-wise loss).
    - ``global``: f from ``counts_E`` when given (the layer passes the step's running sum of
      counts over its micro-batches so far and over data-parallel ranks, Megatron-Core's
      global-batch balancing), else from this call's counts; P stays this call's mean.
    """
    E = probs_TE.shape[-1]
    probs_TE = probs_TE.float()  # a no-op for the routers' fp32 probabilities
    if scope == "sequence":
        if seq_len is None:
            raise ValueError(
                "model.moe.aux_loss_scope='sequence' needs the input as [B, S, D] "
                "(the layer got a flat [T, D] input); pass sequences or use 'micro_batch'"
            )
        B = probs_TE.shape[0] // seq_len
        ids_BA = topk_ids_TK.reshape(B, -1)
        ones_BA = torch.ones_like(ids_BA, dtype=torch.float32)
        if active_TK is not None:
            ones_BA = active_TK.reshape(B, -1).float()
        counts_BE = torch.zeros(B, E, device=probs_TE.device).scatter_add_(1, ids_BA, ones_BA)
        if active_TK is None:
            f_BE = counts_BE / ids_BA.shape[1]
        else:
            f_BE = counts_BE / counts_BE.sum(-1, keepdim=True).clamp(min=1)
        P_BE = probs_TE.reshape(B, seq_len, E).mean(1)
        return coeff * E * terms(f_BE, P_BE).mean()
    if scope != "global" or counts_E is None:
        counts_E = expert_counts(topk_ids_TK, E, active_TK)
    f_E = counts_E / counts_E.sum().clamp(min=1)
    P_E = probs_TE.mean(0)
    return coeff * E * terms(f_E, P_E)


def z_loss(logits_TE: Tensor, coeff: float) -> Tensor:
    """ST-MoE router z-loss ``coeff * mean_t logsumexp(logits_t)^2`` on the raw router logits."""
    return coeff * torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``out``; in backward, also sends gradient ``scale`` into ``aux_loss``."""

    @staticmethod
    def forward(ctx, out: Tensor, aux_loss: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        ctx.aux_shape = aux_loss.shape
        ctx.aux_dtype = aux_loss.dtype
        if torch.compiler.is_compiling():
            # Not a view when traced: AOTAutograd regenerates an output that aliases a graph
            # input (the eager dispatcher's output) as a plain view of it when the caller views
            # it again, dropping this node and the aux-loss gradient with it (torch 2.13). The
            # copy fuses into the consumer (the block's residual add).
            return out.clone()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_aux = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_out.device)
        return grad_out, grad_aux, None


def attach_aux_loss(out: Tensor, aux_loss: Tensor, scale: float = 1.0) -> Tensor:
    """Return ``out`` unchanged such that ``backward`` through it also backpropagates
    ``scale * aux_loss``. ``scale`` should match how the caller scales its own loss (e.g.
    1 / number of gradient-accumulation micro-batches)."""
    if not aux_loss.requires_grad:
        return out
    return _AttachAuxLoss.apply(out, aux_loss, scale)
