"""The node-deduplicating expert-parallel exchange (``parallel.ep_a2a=node_dedup``).

Legend: T local tokens, D model dim, E experts, N nodes of the EP group, L EP ranks per node,
n = E/N experts per node, R rows.

The flat and hierarchical exchanges send one row per (token, expert) assignment, so a token
with K experts on a remote node crosses the inter-node link K times. This exchange sends each
token **once per destination node** (DeepSeek-V3's dispatch), in two levels built from the
all-to-all dispatcher:

1. inter-node, over the peer group (the EP ranks at this rank's local index, one per node):
   each token goes to the peer on every node that holds one of its kept experts, as one row
   ``[x | w_E | m_E]`` — the token, its combine weight per expert (0 elsewhere) and its kept
   mask (the combine weights and mask travel in the activations' dtype);
2. intra-node, over the node group: the peer routes the rows it received to the node's experts
   (weights and mask of the node's columns), the experts compute, and the node group's combine
   sums each row's weighted expert outputs;
3. the peer returns one row per received token (``[D]``), and the token sums its nodes' rows.

So inter-node rows per layer call and direction are the (token, remote node) pairs: at most
``T * (N - 1)``, and with node-limited routing (``model.moe.max_node_groups`` = M) at most
``T * min(M, N - 1)``, whatever top_k is. The backward pass sends the gradients the same way.
Two host syncs per call (each level's split sizes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moetrain.moe.dispatcher import ExpertsFn, Routing, run_sequentially
from moetrain.parallel.ep import AllToAllDispatcher
from moetrain.parallel.ep_comm import NodeGroups


def _dense_slots(width: int, rows: int, device: torch.device) -> Tensor:
    return torch.arange(width, device=device).expand(rows, width)


class NodeDedupDispatcher:
    """The dispatcher interface over an EP group split into ``groups`` (nodes of L ranks);
    ``ep_rank`` is this rank's index in its EP group."""

    def __init__(self, num_experts: int, groups: NodeGroups, ep_rank: int) -> None:
        self.N, self.L = groups.num_nodes, groups.per_node
        if num_experts % (self.N * self.L):
            raise ValueError(
                f"parallel.ep={self.N * self.L} does not divide num_experts={num_experts}"
            )
        self.num_experts = num_experts
        self.per_node = num_experts // self.N
        self.node = ep_rank // self.L
        self.between = AllToAllDispatcher(self.N, groups.peers)  # "expert" b: node b's peer
        self.within = AllToAllDispatcher(self.per_node, groups.node)

    def _node_rows(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Routing]:
        """Each token's row and its per-node slots for the inter-node level."""
        T, E, N = x_TD.shape[0], self.num_experts, self.N
        ids_TK, w_TK = routing.topk_ids_TK, routing.topk_weights_TK
        keep_TK = routing.keep_TK
        kept = (
            torch.ones_like(ids_TK, dtype=w_TK.dtype) if keep_TK is None else keep_TK.to(w_TK.dtype)
        )
        w_TE = w_TK.new_zeros(T, E).scatter_add(1, ids_TK, w_TK * kept)
        m_TE = kept.new_zeros(T, E).scatter_add(1, ids_TK, kept) > 0
        to_node_TN = m_TE.view(T, N, self.per_node).any(-1)
        row_TX = torch.cat([x_TD, w_TE.to(x_TD.dtype), m_TE.to(x_TD.dtype)], -1)
        ones_TN = torch.ones(T, N, dtype=w_TK.dtype, device=x_TD.device)
        return row_TX, Routing(_dense_slots(N, T, x_TD.device), ones_TN, to_node_TN, None)

    def _expert_slots(self, rows_RX: Tensor) -> tuple[Tensor, Routing]:
        """The received rows' tokens and their slots on this node's experts."""
        R, D, E, n = (
            rows_RX.shape[0],
            rows_RX.shape[1] - 2 * self.num_experts,
            self.num_experts,
            self.per_node,
        )
        lo = self.node * n
        w_Rn = rows_RX[:, D + lo : D + lo + n]
        m_Rn = rows_RX[:, D + E + lo : D + E + lo + n].detach() > 0.5
        return rows_RX[:, :D], Routing(_dense_slots(n, R, rows_RX.device), w_Rn, m_Rn, None)

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor]:
        row_TX, node_routing = self._node_rows(x_TD, routing)
        received_RX, _ = self.between.dispatch(row_TX, node_routing)
        tokens_RD, expert_routing = self._expert_slots(received_RX)
        return self.within.dispatch(tokens_RD, expert_routing)

    def combine(self, expert_output_RD: Tensor) -> Tensor:
        per_token_RD = self.within.combine(expert_output_RD)
        return self.between.combine(per_token_RD)

    def run(
        self,
        x_TD: Tensor,
        routing: Routing,
        experts: ExpertsFn,
        overlap_fn: Callable[[], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if routing.pad_to_capacity is not None:
            raise ValueError(
                "parallel.ep_a2a=node_dedup does not pad experts to fixed rows "
                "(model.moe.pad_to_capacity, expert_choice): use parallel.ep_a2a=flat"
            )
        return run_sequentially(self, x_TD, routing, experts, overlap_fn)
