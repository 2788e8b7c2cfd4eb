"""Overlapped expert-parallel exchange: chunked all-to-alls pipelined with the expert GEMMs.

Legend: P EP ranks, e local experts, E = P x e experts, R rows, D model dim, n chunks (the
overlap degree, ``parallel.ep_overlap_chunks``).

Each (source rank, global expert) segment of rows is split into n contiguous chunks (chunk c
takes rows ``[c*m//n, (c+1)*m//n)`` of a segment of m rows), so every rank derives every chunk's
split sizes from the counts it already has, and no extra count exchange is needed. Capacity,
padding and dropping were decided before (by the routing); chunking only changes when rows
travel and in which GEMM they are multiplied. The rows keep the layout of the unchunked
dispatcher outside this module, so the permute before and the weighted combine after it are
the same ops on the same tensors.

Schedule (chunk i; "issue" = async collective, "wait" = block until it has landed):

    forward:  issue dispatch 0, 1 | shared experts | for i: wait dispatch i, experts i,
              issue combine i, issue dispatch i+2 | wait every combine
    backward: issue grad-combine 0, 1 | for i: wait grad-combine i, experts' backward i,
              issue grad-dispatch i, issue grad-combine i+2 | (shared experts' backward) |
              wait every grad-dispatch

so the all-to-all of chunk i+1 is always in flight while the experts compute chunk i, in both
directions, and the shared experts (the ``overlap_fn``) run while the first dispatches fly.

Autograd structure (why two Functions and a manual inner backward): the experts' forward and
backward must be interleaved with collectives in an order that is the same on every rank, which
the autograd engine does not promise for independent branches. ``_ExpertsAndCombine`` therefore
runs each chunk's experts on detached inputs under ``enable_grad`` (a small per-chunk graph) and
its backward walks the chunks itself, calling ``torch.autograd.grad`` on each chunk's graph
between the gradient exchanges. The dispatch is a separate Function (``_DispatchStart``) so that
ordinary autograd code (the shared experts) can run between issuing the first exchanges and
waiting for them; the two Functions share one ``_Pipeline`` object, through which the gradient
exchanges issued by the experts' backward are waited for in the dispatch's backward. The
Function that runs the experts is called inside ``GroupedExperts.forward`` (its ``chunked``
argument), so FSDP's all-gather of the expert weights and its backward hooks work as without
chunking. The per-chunk graphs save their tensors plainly (outer saved-tensor hooks, e.g.
activation checkpointing, do not apply inside them): under activation checkpointing the
experts' activations of a chunked layer are kept, not recomputed.

Exactness: chunking changes how many rows each expert GEMM multiplies, and on CPU (MKL) a
row's result depends on that (a few rows take other kernels), so outputs and gradients agree
with the unchunked dispatcher to float rounding, not bitwise; the expert weight gradients are
in addition sums of per-chunk GEMMs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moetrain.parallel.ep_comm import EPExchange, Pending, Splits, segment_order

# chunks whose dispatch exchange is in flight when a chunk's experts start (this one and the next)
LOOKAHEAD = 2

ExpertCompute = Callable[..., Tensor]  # (rows_RD, tokens_per_expert_e, w1, w3, w2) -> out_RD


def chunk_shares(counts: Tensor, degree: int) -> Tensor:
    """``[degree, *counts.shape]``: the rows of each segment (of ``counts`` rows) in chunk c,
    ``(c+1)*m//degree - c*m//degree``."""
    c = torch.arange(degree + 1).view(-1, *([1] * counts.dim()))
    bounds = (c * counts.long().unsqueeze(0)) // degree
    return bounds[1:] - bounds[:-1]


def chunk_of_rows(counts_S: Tensor, degree: int) -> Tensor:
    """For rows stored as consecutive segments of ``counts_S`` rows, the chunk of each row
    (row p of a segment of m rows is in chunk ``((p+1)*degree - 1) // m``, the inverse of
    :func:`chunk_shares`)."""
    counts = counts_S.long()
    segment = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(segment.numel()) - starts[segment]
    return ((pos + 1) * degree - 1) // counts[segment]


@dataclass
class ChunkPlan:
    """Where each chunk's rows are, on both sides of the exchange (CPU index tensors).

    ``send_perm_R``: canonical send rows (destination rank, local expert, token) -> chunk-major
    order; ``send_rows[c]``: rows of chunk c on this rank's send side; ``splits[c]``: chunk c's
    dispatch exchange; ``expert_order[c]``: received (source rank, local expert) order -> (local
    expert, source rank) order; ``expert_counts[c]``: chunk c's rows per local expert.
    """

    send_perm_R: Tensor
    send_rows: list[int]
    splits: list[Splits]
    expert_order: list[Tensor]
    expert_counts: list[Tensor]

    @property
    def degree(self) -> int:
        return len(self.splits)


def plan_chunks(send_Pe: Tensor, recv_Pe: Tensor, full_PE: Tensor | None, degree: int) -> ChunkPlan:
    """Split one layer call's exchange into ``degree`` chunks.

    Args: ``send_Pe`` rows this rank sends per (destination rank, local expert); ``recv_Pe``
    rows it receives per (source rank, local expert); ``full_PE`` every rank's rows per global
    expert (hierarchical exchange only, else None). All CPU int64.
    """
    P, e = send_Pe.shape
    send_shares = chunk_shares(send_Pe, degree)  # [n, P, e]
    recv_shares = chunk_shares(recv_Pe, degree)
    full = None if full_PE is None else chunk_shares(full_PE, degree).view(degree, P, P, e).sum(-1)
    send_perm = torch.sort(chunk_of_rows(send_Pe.flatten(), degree), stable=True).indices
    splits = [
        Splits(
            send_shares[c].sum(1).tolist(),
            recv_shares[c].sum(1).tolist(),
            None if full is None else full[c],
        )
        for c in range(degree)
    ]
    return ChunkPlan(
        send_perm_R=send_perm,
        send_rows=send_shares.sum((1, 2)).tolist(),
        splits=splits,
        expert_order=[segment_order(recv_shares[c]) for c in range(degree)],
        expert_counts=[recv_shares[c].sum(0) for c in range(degree)],
    )


def _keep(t: Tensor) -> Tensor:
    return t


def _unpermute_rows(rows: Tensor, order: Tensor) -> Tensor:
    """Inverse of ``rows_in.index_select(0, order)``: ``out[order[k]] = rows[k]``."""
    return torch.empty_like(rows).index_copy_(0, order, rows)


class _Pipeline:
    """One layer call's chunked exchange: the state both autograd Functions share."""

    def __init__(self, plan: ChunkPlan, comm: EPExchange, device: torch.device) -> None:
        self.plan, self.comm = plan, comm
        n = plan.degree
        self.send_perm = plan.send_perm_R.to(device)
        self.orders = [o.to(device) for o in plan.expert_order]
        self.send_chunks: Sequence[Tensor] = ()
        self.dispatched: list[Pending | None] = [None] * n
        self.graphs: list[tuple[Tensor, Tensor] | None] = [None] * n
        self.weights: list[Tensor | None] = []
        self.rows_need_grad = False
        # gradient rows in flight from the experts' backward to the dispatch's backward
        self.grad_rows: list[Pending | None] = [None] * n

    # --- forward -----------------------------------------------------------------------------

    def _issue_dispatch(self, c: int) -> None:
        if c < self.plan.degree:
            self.dispatched[c] = self.comm.start(
                self.send_chunks[c], self.plan.splits[c], "ep dispatch (overlapped)"
            )

    def start_dispatch(self, sent_RD: Tensor) -> None:
        chunked_RD = sent_RD.index_select(0, self.send_perm)
        self.send_chunks = chunked_RD.split(self.plan.send_rows)
        for c in range(LOOKAHEAD):
            self._issue_dispatch(c)

    def chunked(self, token: Tensor, compute: ExpertCompute, weights: Sequence[Tensor | None]):
        """``GroupedExperts.forward``'s ``chunked`` callback: runs inside the experts' forward."""
        w1, w3, w2 = weights
        needs_grad = token.requires_grad or any(w is not None and w.requires_grad for w in weights)
        build_graph = torch.is_grad_enabled() and needs_grad
        return _ExpertsAndCombine.apply(token, self, compute, build_graph, w1, w3, w2)

    def run_experts(
        self, compute: ExpertCompute, weights: Sequence[Tensor | None], build_graph: bool
    ) -> Tensor:
        plan = self.plan
        if build_graph:
            self.weights = [
                None if w is None else w.detach().requires_grad_(w.requires_grad) for w in weights
            ]
        else:
            self.weights = list(weights)
        combined: list[Pending] = []
        for c in range(plan.degree):
            received = self._take(self.dispatched, c).wait()
            rows = received.index_select(0, self.orders[c])  # -> (local expert, source) order
            out = self._experts_chunk(compute, rows, plan.expert_counts[c], build_graph, c)
            back = _unpermute_rows(out, self.orders[c])  # -> (source, local expert) order
            # rows go back with the splits swapped; they land where chunk c's rows left from
            combined.append(
                self.comm.start(back, plan.splits[c].reversed(), "ep combine (overlapped)")
            )
            self._issue_dispatch(c + LOOKAHEAD)
        self.send_chunks = ()
        returned = torch.cat([p.wait() for p in combined])
        return _unpermute_rows(returned, self.send_perm)  # chunk-major -> canonical

    def _experts_chunk(
        self, compute: ExpertCompute, rows: Tensor, counts: Tensor, build_graph: bool, c: int
    ) -> Tensor:
        if not build_graph:
            return compute(rows, counts, *self.weights)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            leaf = rows.requires_grad_(self.rows_need_grad)
            out = compute(leaf, counts, *self.weights)
        self.graphs[c] = (leaf, out)
        return out.detach()

    @staticmethod
    def _take(pending: list[Pending | None], c: int) -> Pending:
        p = pending[c]
        if p is None:
            raise RuntimeError(f"overlapped expert-parallel exchange: chunk {c} is not in flight")
        pending[c] = None
        return p

    # --- backward ----------------------------------------------------------------------------

    def experts_backward(self, grad_RD: Tensor, rows_need_grad: bool) -> list[Tensor | None]:
        """Gradient exchanges and the experts' backward, chunk by chunk; returns the weight
        gradients (None where a weight needs none) and leaves the rows' gradients in flight."""
        plan, n = self.plan, self.plan.degree
        if any(graph is None for graph in self.graphs):  # before any collective is issued
            raise RuntimeError(
                "backward through the overlapped expert-parallel exchange twice (retain_graph="
                "True) is not supported; use parallel.ep_overlap_chunks=1"
            )
        rows_need_grad = rows_need_grad and self.rows_need_grad
        chunks = grad_RD.contiguous().index_select(0, self.send_perm).split(plan.send_rows)
        grad_out: list[Pending | None] = [None] * n

        def issue(c: int) -> None:  # the output gradient travels the way the rows came
            if c < n:
                grad_out[c] = self.comm.start(
                    chunks[c], plan.splits[c], "ep combine grad (overlapped)"
                )

        wanted = [i for i, w in enumerate(self.weights) if w is not None and w.requires_grad]
        wanted_weights = [w for w in self.weights if w is not None and w.requires_grad]
        grad_w: list[Tensor | None] = [None] * len(self.weights)
        for c in range(LOOKAHEAD):
            issue(c)
        for c in range(n):
            g_RD = self._take(grad_out, c).wait().index_select(0, self.orders[c])
            graph, self.graphs[c] = self.graphs[c], None
            assert graph is not None  # checked above
            leaf, out = graph
            inputs = ([leaf] if rows_need_grad else []) + wanted_weights
            grads = torch.autograd.grad(out, inputs, g_RD, allow_unused=True)
            if rows_need_grad:
                g_leaf = grads[0] if grads[0] is not None else torch.zeros_like(leaf)
                back = _unpermute_rows(g_leaf, self.orders[c])
                self.grad_rows[c] = self.comm.start(
                    back, plan.splits[c].reversed(), "ep dispatch grad (overlapped)"
                )
                grads = grads[1:]
            for i, g in zip(wanted, grads):
                if g is not None:
                    acc = grad_w[i]
                    grad_w[i] = g if acc is None else acc + g
            issue(c + LOOKAHEAD)
        return grad_w

    def dispatch_backward(self) -> Tensor:
        grads = torch.cat([self._take(self.grad_rows, c).wait() for c in range(self.plan.degree)])
        return _unpermute_rows(grads, self.send_perm)


class _DispatchStart(torch.autograd.Function):
    """Issues the first chunks' dispatch exchanges; returns an empty token that orders the
    experts after it. Backward: waits for the rows' gradients the experts' backward sent back
    (the exchange with the splits swapped) and puts them back in canonical order."""

    @staticmethod
    def forward(ctx: Any, sent_RD: Tensor, pipe: _Pipeline) -> Tensor:
        ctx.pipe = pipe
        pipe.rows_need_grad = sent_RD.requires_grad
        pipe.start_dispatch(sent_RD)
        return sent_RD.new_empty(0)

    @staticmethod
    def backward(ctx: Any, grad_token: Tensor):
        del grad_token
        return ctx.pipe.dispatch_backward(), None


class _ExpertsAndCombine(torch.autograd.Function):
    """Waits for each chunk, runs its experts, sends it back; returns the combined rows in the
    canonical send layout (the rows' destination order). Backward: see the module docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        token: Tensor,
        pipe: _Pipeline,
        compute: ExpertCompute,
        build_graph: bool,
        w1: Tensor,
        w3: Tensor | None,
        w2: Tensor,
    ) -> Tensor:
        ctx.pipe = pipe
        pipe.rows_need_grad = pipe.rows_need_grad and token.requires_grad
        return pipe.run_experts(compute, (w1, w3, w2), build_graph)

    @staticmethod
    def backward(ctx: Any, grad_RD: Tensor):
        rows_need_grad = bool(ctx.needs_input_grad[0])
        g1, g3, g2 = ctx.pipe.experts_backward(grad_RD, rows_need_grad)
        grad_token = grad_RD.new_zeros(0) if rows_need_grad else None
        return grad_token, None, None, None, g1, g3, g2


def overlapped_experts(
    sent_RD: Tensor,
    plan: ChunkPlan,
    comm: EPExchange,
    experts: Callable[..., Tensor],
    overlap_fn: Callable[[], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Dispatch ``sent_RD`` (canonical send layout, differentiable), run ``experts`` on the
    chunks as they arrive, and return the combined rows in the same layout, plus
    ``overlap_fn()``, run while the first dispatch exchanges are in flight.

    ``experts`` is called once as ``experts(token, None, chunked=callback)`` (a
    ``GroupedExperts``): the callback receives the experts' local weights inside their forward.
    """
    pipe = _Pipeline(plan, comm, sent_RD.device)
    token = _DispatchStart.apply(sent_RD, pipe)
    side = overlap_fn() if overlap_fn is not None else None
    return experts(token, None, chunked=pipe.chunked), side
