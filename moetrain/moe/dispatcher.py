"""Token dispatchers: route token rows to experts and back.

Legend: T tokens, D model dim, E experts (global), e local experts, K top-k, C capacity,
R expert rows (kept assignments in expert order, plus padding rows with pad_to_capacity).

Interface (every dispatcher):

    y_TD, side = dispatcher.run(x_TD, routing, experts, overlap_fn)

runs the whole exchange: dispatch, ``experts(rows_RD, tokens_per_local_expert_e)``, combine;
``overlap_fn`` (the shared experts, or None) is work that does not depend on the routed
experts: a dispatcher runs it where it hides communication and returns its result as ``side``.
``run`` is what the MoE layer calls, so a dispatcher can interleave the experts with its
exchanges (the overlapped all-to-all dispatcher splits them into chunks). The two halves are
also available on their own:

    expert_input_RD, tokens_per_local_expert_e = dispatcher.dispatch(x_TD, routing)
    y_TD = dispatcher.combine(expert_output_RD)

``tokens_per_local_expert_e`` is an int64 CPU tensor (the grouped expert GEMM's split sizes).
A dispatcher keeps what ``combine`` needs from the last ``dispatch``. ``TokenDispatcher`` is the
single-process one (a local permute); expert-parallel dispatchers are tested against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.profiler import record_function

from moetrain.ops import expert_sort, permute, unpermute


@dataclass
class Routing:
    """The router's decision after capacity, as the dispatcher consumes it.

    ``keep_TK`` is None when dropless. ``pad_to_capacity`` is the capacity C to pad every
    expert's rows to (fixed shapes), or None.
    """

    topk_ids_TK: Tensor
    topk_weights_TK: Tensor
    keep_TK: Tensor | None = None
    pad_to_capacity: int | None = None


@dataclass
class ExpertRows:
    """Where each expert row comes from: ``row_token_R`` (-1 = padding), ``row_weight_R``
    (differentiable, 0 on padding) and the rows per expert ``tokens_per_expert_E`` (CPU)."""

    row_token_R: Tensor
    row_weight_R: Tensor
    tokens_per_expert_E: Tensor


def sort_by_expert(routing: Routing, num_experts: int) -> ExpertRows:
    """Order the kept assignments by expert (token order inside each expert)."""
    E = num_experts
    K = routing.topk_ids_TK.shape[-1]
    flat_ids = routing.topk_ids_TK.flatten()
    if routing.keep_TK is not None:
        flat_ids = flat_ids.masked_fill(~routing.keep_TK.flatten(), E)  # dropped sort last
    order, counts = expert_sort(flat_ids, E + 1)  # a counting sort; bin E = dropped
    counts_E = counts[:E]
    # host sync: the expert GEMMs need the split sizes on the host
    counts_cpu = counts_E.cpu()
    num_rows = int(counts_cpu.sum())
    order = order[:num_rows]
    row_token_R = order // K
    row_weight_R = routing.topk_weights_TK.flatten()[order]
    C = routing.pad_to_capacity
    if C is None:
        return ExpertRows(row_token_R, row_weight_R, counts_cpu)
    expert_R = flat_ids[order]
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    slot_R = expert_R * C + torch.arange(num_rows, device=order.device) - starts_E[expert_R]
    padded_token = torch.full((E * C,), -1, dtype=row_token_R.dtype, device=order.device)
    padded_token = padded_token.scatter(0, slot_R, row_token_R)
    padded_weight = row_weight_R.new_zeros(E * C).scatter(0, slot_R, row_weight_R)
    return ExpertRows(padded_token, padded_weight, torch.full((E,), C, dtype=torch.long))


ExpertsFn = Callable[..., Tensor]  # experts(rows_RD, tokens_per_local_expert_e) -> rows_RD


class Dispatcher(Protocol):
    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor]: ...

    def combine(self, expert_output_RD: Tensor) -> Tensor: ...

    def run(
        self,
        x_TD: Tensor,
        routing: Routing,
        experts: ExpertsFn,
        overlap_fn: Callable[[], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]: ...


def run_sequentially(
    dispatcher: Dispatcher,
    x_TD: Tensor,
    routing: Routing,
    experts: ExpertsFn,
    overlap_fn: Callable[[], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """dispatch -> experts -> combine, then ``overlap_fn`` (nothing to hide it behind)."""
    with record_function("moe/dispatch"):  # named ranges: train.profile_steps traces
        rows_RD, tokens_per_expert = dispatcher.dispatch(x_TD, routing)
    with record_function("moe/experts"):
        out_RD = experts(rows_RD, tokens_per_expert)
    with record_function("moe/combine"):
        y_TD = dispatcher.combine(out_RD)
    return y_TD, overlap_fn() if overlap_fn is not None else None


class TokenDispatcher:
    """Single-process dispatcher: every expert is local (e = E)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self._rows: ExpertRows | None = None
        self._num_tokens = 0

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor]:
        rows = sort_by_expert(routing, self.num_experts)
        self._rows, self._num_tokens = rows, x_TD.shape[0]
        return permute(x_TD, rows.row_token_R), rows.tokens_per_expert_E

    def combine(self, expert_output_RD: Tensor) -> Tensor:
        if self._rows is None:
            raise RuntimeError("combine() called before dispatch()")
        rows, self._rows = self._rows, None
        return unpermute(expert_output_RD, rows.row_token_R, rows.row_weight_R, self._num_tokens)

    def run(
        self,
        x_TD: Tensor,
        routing: Routing,
        experts: ExpertsFn,
        overlap_fn: Callable[[], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        return run_sequentially(self, x_TD, routing, experts, overlap_fn)
