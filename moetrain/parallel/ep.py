"""Expert parallelism: the all-to-all token dispatcher.

Legend: T local tokens, D model dim, E experts (global), P EP ranks, e = E/P local experts,
R rows.

``AllToAllDispatcher`` implements the MoE layer's dispatcher interface across the ranks of an EP
group (EP rank i holds experts [i*e, (i+1)*e)):

    dispatch: sort local assignments by global expert -> exchange per-expert counts ->
              all-to-all the rows -> regroup the received rows by local expert
    combine:  regroup back by source rank -> all-to-all back -> weighted unpermute to tokens

Capacity dropping and padding are decided locally before dispatch (capacity is per rank's local
tokens, as Megatron-Core), so the result equals running the single-process layer on each rank's
tokens with the same weights; ``TokenDispatcher`` is the reference the tests compare against.

Two options (``EPOptions``, from ``parallel.ep_overlap_chunks`` / ``parallel.ep_a2a``):

- ``overlap_chunks > 1``: ``run`` splits the exchange and the experts into chunks and pipelines
  them (``moetrain.parallel.ep_overlap``); 1 runs dispatch, experts and combine one after the
  other.
- the exchange: one flat all-to-all over the EP group, or the hierarchical (2-D) one whose
  inter-node traffic only flows between peer ranks of the nodes (``moetrain.parallel.ep_comm``),
  or the node-deduplicating one that sends a token once per destination node
  (``moetrain.parallel.ep_dedup``, its own dispatcher).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moetrain.moe.dispatcher import (
    ExpertRows,
    ExpertsFn,
    Routing,
    expert_order,
    expert_rows,
    run_sequentially,
)
from moetrain.ops import permute, unpermute
from moetrain.parallel.ep_comm import EPExchange, FlatAllToAll, HostCounts, Splits, segment_order
from moetrain.parallel.ep_overlap import overlapped_experts, plan_chunks

A2A_MODES = ("flat", "hierarchical", "node_dedup")
NODE_MODES = ("hierarchical", "node_dedup")  # need the ranks per node


@dataclass(frozen=True)
class EPOptions:
    """How the all-to-all dispatcher runs: ``overlap_chunks`` (1 = no overlap), ``a2a`` (flat |
    hierarchical) and, for hierarchical, ``ranks_per_node`` (consecutive global ranks sharing a
    node)."""

    overlap_chunks: int = 1
    a2a: str = "flat"
    ranks_per_node: int | None = None

    def __post_init__(self) -> None:
        if self.overlap_chunks < 1:
            raise ValueError(f"overlap_chunks must be >= 1, got {self.overlap_chunks}")
        if self.a2a not in A2A_MODES:
            raise ValueError(f"a2a must be one of {A2A_MODES}, got {self.a2a!r}")
        if self.a2a in NODE_MODES and (self.ranks_per_node or 0) < 1:
            raise ValueError(f"the {self.a2a} all-to-all needs ranks_per_node >= 1")


class _Exchange(torch.autograd.Function):
    """Differentiable row exchange (uneven splits) through an ``EPExchange``; ``names`` =
    (forward, backward) exchange names for the activity record."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, splits: Splits, comm: EPExchange, names: tuple[str, str]
    ) -> Tensor:
        ctx.splits, ctx.comm, ctx.backward_name = splits, comm, names[1]
        # rows for EP rank r leave from x[sum(send[:r]):...]; rows from rank r land at recv[r]
        return comm.start(x, splits, names[0]).wait()

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        # the gradient travels back the way the rows came: splits swapped
        back = ctx.comm.start(grad, ctx.splits.reversed(), ctx.backward_name).wait()
        return back, None, None, None


_DISPATCH = ("ep dispatch", "ep dispatch grad")
_COMBINE = ("ep combine", "ep combine grad")


def exchange(
    x: Tensor, splits: Splits, comm: EPExchange, names: tuple[str, str] = _DISPATCH
) -> Tensor:
    return _Exchange.apply(x, splits, comm, names)


@dataclass
class _Routed:
    """One call's routing as the exchange needs it (host counts)."""

    rows: ExpertRows
    counts: HostCounts

    @property
    def send_Pe(self) -> Tensor:  # rows to (destination rank, local expert)
        return self.counts.send_Pe

    @property
    def recv_Pe(self) -> Tensor:  # rows from (source rank, local expert)
        return self.counts.recv_Pe

    @property
    def full_PE(self) -> Tensor | None:  # every rank's rows per global expert (hierarchical)
        return self.counts.full_PE

    def splits(self) -> Splits:
        full = None
        if self.full_PE is not None:
            P = self.send_Pe.shape[0]
            full = self.full_PE.view(P, P, -1).sum(-1)
        return Splits(self.send_Pe.sum(1).tolist(), self.recv_Pe.sum(1).tolist(), full)


class AllToAllDispatcher:
    """Dispatcher over an EP process group; every rank of the group calls dispatch and combine
    (or run) together (the exchanges are collective).

    Args: ``num_experts`` E; ``group`` the EP process group (None: the default group);
    ``overlap_chunks`` (``run`` only; 1 = dispatch, experts, combine in turn); ``comm`` the row
    exchange (default: a flat all-to-all over ``group``; a ``HierarchicalAllToAll`` for 2-D).
    """

    def __init__(
        self,
        num_experts: int,
        group: Any,
        overlap_chunks: int = 1,
        comm: EPExchange | None = None,
    ) -> None:
        self.group = group
        self.comm: EPExchange = comm if comm is not None else FlatAllToAll(group)
        self.ep = self.comm.size
        if num_experts % self.ep:
            raise ValueError(f"parallel.ep={self.ep} does not divide num_experts={num_experts}")
        if overlap_chunks < 1:
            raise ValueError(f"parallel.ep_overlap_chunks must be >= 1, got {overlap_chunks}")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep
        self.overlap_chunks = overlap_chunks
        self._state: tuple[ExpertRows, int, Splits, Tensor] | None = None

    def _route(self, x_TD: Tensor, routing: Routing) -> _Routed:
        ordered = expert_order(routing, self.num_experts)
        C = routing.pad_to_capacity
        sent_E = ordered.counts_E if C is None else torch.full_like(ordered.counts_E, C)
        # counts per (destination rank, local expert) -> per (source rank, local expert): the
        # layer's one host sync, which also gives the kept rows' count after dropping
        counts = self.comm.exchange_counts(sent_E.view(self.ep, self.num_local))
        rows = expert_rows(routing, ordered, counts.send_Pe.flatten().tolist())
        return _Routed(rows, counts)

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor]:
        routed = self._route(x_TD, routing)
        splits = routed.splits()
        received_RD = exchange(permute(x_TD, routed.rows.row_token_R), splits, self.comm, _DISPATCH)
        # (source, local expert) -> (local expert, source)
        order = segment_order(routed.recv_Pe).to(x_TD.device)
        self._state = (routed.rows, x_TD.shape[0], splits, order)
        return permute(received_RD, order), routed.recv_Pe.sum(0)

    def combine(self, expert_output_RD: Tensor) -> Tensor:
        if self._state is None:
            raise RuntimeError("combine() called before dispatch()")
        (rows, num_tokens, splits, order), self._state = self._state, None
        by_source_RD = unpermute(expert_output_RD, order, None, expert_output_RD.shape[0])
        returned_RD = exchange(by_source_RD, splits.reversed(), self.comm, _COMBINE)
        return unpermute(returned_RD, rows.row_token_R, rows.row_weight_R, num_tokens)

    def run(
        self,
        x_TD: Tensor,
        routing: Routing,
        experts: ExpertsFn,
        overlap_fn: Callable[[], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """dispatch -> ``experts`` -> combine; with ``overlap_chunks > 1`` pipelined in chunks
        (``experts`` must then be a ``GroupedExperts``, see ``ep_overlap``) and ``overlap_fn``
        runs while the first chunks' rows are in flight."""
        if self.overlap_chunks == 1:
            return run_sequentially(self, x_TD, routing, experts, overlap_fn)
        routed = self._route(x_TD, routing)
        plan = plan_chunks(routed.send_Pe, routed.recv_Pe, routed.full_PE, self.overlap_chunks)
        sent_RD = permute(x_TD, routed.rows.row_token_R)
        returned_RD, side = overlapped_experts(sent_RD, plan, self.comm, experts, overlap_fn)
        rows = routed.rows
        return unpermute(returned_RD, rows.row_token_R, rows.row_weight_R, x_TD.shape[0]), side
