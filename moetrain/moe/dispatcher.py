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

``tokens_per_local_expert_e`` (int64) holds the grouped expert GEMM's split sizes, on the rows'
device when the dispatcher needed no host sync to build them, else on the host (docs/moe.md,
"Host syncs").
A dispatcher keeps what ``combine`` needs from the last ``dispatch``. ``TokenDispatcher`` is the
single-process one (a local permute); expert-parallel dispatchers are tested against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from moetrain.ops import expert_sort, permute, unpermute
from moetrain.phases import phase


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
    (differentiable, 0 on padding) and the rows per expert ``tokens_per_expert_E`` (int64; on the
    device when no host sync was needed to build the rows, else on the host)."""

    row_token_R: Tensor
    row_weight_R: Tensor
    tokens_per_expert_E: Tensor


@dataclass
class ExpertOrder:
    """The counting sort's result, all on the routing's device: ``order_A`` (assignment
    indices, expert-major, dropped ones last), ``flat_ids_A`` (expert id per assignment, E for
    a dropped one) and ``counts_E`` (kept assignments per expert)."""

    order_A: Tensor
    flat_ids_A: Tensor
    counts_E: Tensor


def expert_order(routing: Routing, num_experts: int) -> ExpertOrder:
    """Sort the assignments by expert on the device (no host sync)."""
    E = num_experts
    flat_ids = routing.topk_ids_TK.flatten()
    if routing.keep_TK is not None:
        flat_ids = flat_ids.masked_fill(~routing.keep_TK.flatten(), E)  # dropped sort last
    order, counts = expert_sort(flat_ids, E + 1)  # a counting sort; bin E = dropped
    return ExpertOrder(order, flat_ids, counts[:E])


def expert_rows(
    routing: Routing, ordered: ExpertOrder, host_counts: list[int] | None = None
) -> ExpertRows:
    """The rows of :func:`expert_order`'s kept assignments (token order inside each expert).

    Dropless and padded rows have host-known shapes and need no host sync; when capacity drops
    assignments without padding, the number of rows is read from ``host_counts`` (the kept
    counts per expert, when the caller already has them on the host) or, failing that, from the
    device (one host sync).
    """
    K = routing.topk_ids_TK.shape[-1]
    order, counts_E = ordered.order_A, ordered.counts_E
    C = routing.pad_to_capacity
    if C is not None:
        return _padded_rows(routing, ordered, C)
    tokens_per_expert = counts_E
    if routing.keep_TK is not None:
        if host_counts is None:
            host_counts = counts_E.tolist()  # host sync: the rows kept after dropping (a shape)
        order = order[: sum(host_counts)]
        tokens_per_expert = torch.tensor(host_counts, dtype=torch.long)
    row_weight_R = routing.topk_weights_TK.flatten()[order]
    return ExpertRows(order // K, row_weight_R, tokens_per_expert)


def _padded_rows(routing: Routing, ordered: ExpertOrder, C: int) -> ExpertRows:
    """Every expert's rows padded to ``C`` slots; dropped assignments go to one spare slot that
    is cut off, so the shapes never depend on the routing."""
    K = routing.topk_ids_TK.shape[-1]
    order, counts_E = ordered.order_A, ordered.counts_E
    E = counts_E.shape[0]
    expert_A = ordered.flat_ids_A[order]
    starts_E1 = torch.cumsum(counts_E, 0) - counts_E
    starts_E1 = torch.cat([starts_E1, starts_E1.new_zeros(1)])
    rank_A = torch.arange(order.shape[0], device=order.device) - starts_E1[expert_A]
    slot_A = torch.where(expert_A < E, expert_A * C + rank_A, E * C)
    token = torch.full((E * C + 1,), -1, dtype=order.dtype, device=order.device)
    token = token.scatter(0, slot_A, order // K)[: E * C]
    weights = routing.topk_weights_TK.flatten()[order]
    weight = weights.new_zeros(E * C + 1).scatter(0, slot_A, weights)[: E * C]
    return ExpertRows(token, weight, torch.full((E,), C, dtype=torch.long))


def sort_by_expert(routing: Routing, num_experts: int) -> ExpertRows:
    """Order the kept assignments by expert (token order inside each expert): at most one host
    sync, only when capacity drops assignments without padding."""
    return expert_rows(routing, expert_order(routing, num_experts))


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
    with phase("moe/dispatch"):  # named ranges: profiler traces, moetrain.phases timing
        rows_RD, tokens_per_expert = dispatcher.dispatch(x_TD, routing)
    with phase("moe/experts"):
        out_RD = experts(rows_RD, tokens_per_expert)
    with phase("moe/combine"):
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
