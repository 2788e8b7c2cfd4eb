"""Expert parallelism: the all-to-all token dispatcher.

Legend: T local tokens, D model dim, E experts (global), e = E/ep local experts, R rows.

``AllToAllDispatcher`` implements the MoE layer's dispatcher interface across the ranks of an EP
group (EP rank i holds experts [i*e, (i+1)*e)):

    dispatch: sort local assignments by global expert -> exchange per-expert counts ->
              all-to-all the rows -> regroup the received rows by local expert
    combine:  regroup back by source rank -> all-to-all back -> weighted unpermute to tokens

Capacity dropping and padding are decided locally before dispatch (capacity is per rank's local
tokens, as Megatron-Core), so the result equals running the single-process layer on each rank's
tokens with the same weights; ``TokenDispatcher`` is the reference the tests compare against.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moetrain.moe.dispatcher import ExpertRows, Routing, sort_by_expert
from moetrain.ops import permute, unpermute


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` with uneven splits."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        # rows x[sum(in_splits[:r]):...] go to rank r; rows from rank r land at out_splits[r]
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        # the gradient travels back the way the rows came: splits swapped
        grad_in = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def chunk_order(counts_AB: Tensor) -> Tensor:
    """Row permutation that regroups rows stored as A x B chunks (A-major, chunk (a, b) of
    ``counts_AB[a, b]`` rows) into B-major order: result[i] = source row of output row i."""
    starts = (torch.cumsum(counts_AB.flatten(), 0) - counts_AB.flatten()).view_as(counts_AB)
    pieces = [
        torch.arange(int(starts[a, b]), int(starts[a, b] + counts_AB[a, b]))
        for b in range(counts_AB.shape[1])
        for a in range(counts_AB.shape[0])
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


class AllToAllDispatcher:
    """Dispatcher over an EP process group; every rank of the group calls dispatch and combine
    together (the exchanges are collective)."""

    def __init__(self, num_experts: int, group) -> None:
        self.group = group
        self.ep = dist.get_world_size(group)
        if num_experts % self.ep:
            raise ValueError(f"parallel.ep={self.ep} does not divide num_experts={num_experts}")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep
        self._state: tuple[ExpertRows, int, list[int], list[int], Tensor] | None = None

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor]:
        rows = sort_by_expert(routing, self.num_experts)
        # counts per (destination rank, local expert) -> per (source rank, local expert)
        # counts travel on the rows' device (NCCL needs device tensors, gloo takes CPU ones)
        send_counts = rows.tokens_per_expert_E.view(self.ep, self.num_local).to(x_TD.device)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        recv_counts = recv_counts.cpu()  # host sync: the split sizes of the token exchange
        in_splits = rows.tokens_per_expert_E.view(self.ep, self.num_local).sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()
        sent_RD = permute(x_TD, rows.row_token_R)
        received_RD = all_to_all(sent_RD, out_splits, in_splits, self.group)
        # (source, local expert) -> (local expert, source)
        order = chunk_order(recv_counts).to(x_TD.device)
        self._state = (rows, x_TD.shape[0], in_splits, out_splits, order)
        return permute(received_RD, order), recv_counts.sum(0)

    def combine(self, expert_output_RD: Tensor) -> Tensor:
        if self._state is None:
            raise RuntimeError("combine() called before dispatch()")
        (rows, num_tokens, in_splits, out_splits, order), self._state = self._state, None
        by_source_RD = unpermute(expert_output_RD, order, None, expert_output_RD.shape[0])
        returned_RD = all_to_all(by_source_RD, in_splits, out_splits, self.group)
        return unpermute(returned_RD, rows.row_token_R, rows.row_weight_R, num_tokens)
