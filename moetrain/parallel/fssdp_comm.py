"""FSSDP's two sparse collectives: SparseAllGather (materialize the planned experts from their
shards) and SparseReduceScatter (return the materialized experts' gradients to their shards).

Legend: N ranks of the FSSDP group, E experts (global), m experts this rank materializes, F
expert hidden dim, f = F / N (one shard's slice of F), D model dim, W elements of one expert's
shard (all its weights, packed).

Every rank holds shard ``r`` of every expert: the slice ``[r*f, (r+1)*f)`` of F of each weight
(``w1``/``w3`` ``[E, f, D]``, ``w2`` ``[E, D, f]``). One expert's shards pack into one row of W
elements (:class:`ShardLayout`), so both collectives are one ``all_to_all_single`` of rows over
the group, with split sizes every rank derives from the plan (``holds_EQ``: rank q
materializes expert e):

- SparseAllGather: rank r sends its packed shard of expert e to every other rank that
  materializes e; rank q receives, for each of its m experts, the N - 1 other shards and
  concatenates all N along F. Bytes received per (expert, rank) pair: the expert's size x
  (N - 1) / N. An expert nobody materializes is never sent.
- SparseReduceScatter: the reverse. Rank q cuts each materialized expert's full gradient into
  its N F-slices and sends slice r to rank r; rank r sums the slices it receives for each expert
  — over the senders in rank order, its own slice at its place, so the sum is the same on
  every run — into its shard's gradient. An expert nobody materialized gets a zero gradient.

``PendingGather`` and ``PendingReduce`` issue their exchange asynchronously when constructed;
``wait`` finishes it, so the token exchange can fly at the same time. A rank waiting in one is
recorded in ``moetrain.parallel.activity`` (``all_to_all (fssdp expert gather) on fssdp group
ranks [...]``) and the wait counts towards its MoE exchange wait time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moetrain.parallel.activity import collective, group_label


@dataclass(frozen=True)
class ShardLayout:
    """How the weights of one expert pack into a row of W elements.

    ``shard_shapes``: each weight's per-expert shard shape (``(f, D)`` or ``(D, f)``);
    ``f_dims``: where F is in that shape (0 or 1); ``num_ranks``: N.
    """

    shard_shapes: tuple[tuple[int, ...], ...]
    f_dims: tuple[int, ...]
    num_ranks: int

    @staticmethod
    def of(shards: list[Tensor], f_dims: list[int], num_ranks: int) -> ShardLayout:
        """The layout of local shards ``[E, ...]`` (one per weight)."""
        return ShardLayout(tuple(tuple(s.shape[1:]) for s in shards), tuple(f_dims), num_ranks)

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shard_shapes]

    @property
    def width(self) -> int:
        """W: elements of one expert's packed shard."""
        return sum(self.sizes)

    def full_shape(self, i: int, num_experts: int) -> tuple[int, ...]:
        """Weight i's shape with F whole, for ``num_experts`` experts."""
        shape = list(self.shard_shapes[i])
        shape[self.f_dims[i]] *= self.num_ranks
        return (num_experts, *shape)

    def pack(self, shards: list[Tensor], ids: Tensor) -> Tensor:
        """Experts ``ids`` of the local shards (``[E, *shard_shape]`` each) -> ``[len(ids), W]``
        (one copy, straight into the columns of each weight)."""
        out = shards[0].new_empty(ids.numel(), self.width)
        for s, part in zip(shards, out.split(self.sizes, 1)):
            torch.index_select(s.reshape(s.shape[0], -1), 0, ids, out=part)
        return out

    def assemble(self, pieces_NmW: Tensor, out: list[Tensor]) -> None:
        """Write the full weights of m experts into ``out`` (one ``[m, *full_shape]`` tensor per
        weight) from their N shards ``pieces_NmW`` (shard r of each expert at ``[r]``)."""
        N, m = pieces_NmW.shape[:2]
        for part, shape, f_dim, dest in zip(
            pieces_NmW.split(self.sizes, 2), self.shard_shapes, self.f_dims, out
        ):
            by_rank = part.view(N, m, *shape)
            # [N, m, f, D] -> [m, N, f, D] = [m, F, D];  [N, m, D, f] -> [m, D, N, f] = [m, D, F]
            order = (1, 0, 2, 3) if f_dim == 0 else (1, 2, 0, 3)
            dest.view(m, *self._split_f(shape, f_dim)).copy_(by_rank.permute(order))

    def scatter(self, full: list[Tensor | None], num_experts: int, like: Tensor) -> Tensor:
        """The inverse of :meth:`assemble` for gradients: full ``[m, *full_shape]`` tensors (None
        = zero) -> ``[N, m, W]`` pieces, piece r holding F-slice r of each."""
        N, m = self.num_ranks, num_experts
        pieces = like.new_empty(N, m, self.width)
        for part, shape, f_dim, g in zip(
            pieces.split(self.sizes, 2), self.shard_shapes, self.f_dims, full
        ):
            if g is None:
                part.zero_()
                continue
            by_f = g.reshape(m, *self._split_f(shape, f_dim))
            order = (1, 0, 2, 3) if f_dim == 0 else (2, 0, 1, 3)
            part.view(N, m, *shape).copy_(by_f.permute(order))
        return pieces

    def _split_f(self, shape: tuple[int, ...], f_dim: int) -> tuple[int, ...]:
        """The full per-expert shape with F as (N, f): (N, f, D) or (D, N, f)."""
        if f_dim == 0:
            return (self.num_ranks, *shape)
        return (shape[0], self.num_ranks, shape[1])


@dataclass(frozen=True)
class Membership:
    """Which experts each rank of the group materializes (from the plan), as index tensors on
    the weights' device: ``experts[q]`` ascending."""

    experts: list[Tensor]
    rank: int

    @staticmethod
    def of(holds_EQ: Tensor, rank: int, device: torch.device) -> Membership:
        N = holds_EQ.shape[1]
        ids = [holds_EQ[:, q].nonzero().flatten().to(device) for q in range(N)]
        return Membership(ids, rank)

    @property
    def num_ranks(self) -> int:
        return len(self.experts)

    @property
    def mine(self) -> Tensor:
        return self.experts[self.rank]

    def counts(self) -> list[int]:
        return [int(e.numel()) for e in self.experts]


class _Exchange:
    """One async ``all_to_all_single`` of rows; keeps its input alive until it completes.
    ``what`` names it in the activity record while a rank waits for it."""

    def __init__(self, x: Tensor, send: list[int], recv: list[int], group: Any, what: str) -> None:
        self.what, self.label = what, group_label(group, "fssdp")
        self.keep: Tensor | None = x.contiguous()
        self.out = x.new_empty(sum(recv), *x.shape[1:])
        # rows keep[sum(send[:r]) : ...] go to group rank r; rows from rank r land at recv[r]
        self.work = dist.all_to_all_single(
            self.out, self.keep, recv, send, group=group, async_op=True
        )

    def wait(self) -> Tensor:
        with collective("all_to_all", self.what, self.label):
            self.work.wait()  # CPU: blocks; NCCL: the current stream waits for NCCL's stream
        self.keep = None
        return self.out


class PendingGather:
    """A SparseAllGather in flight: issued on construction from this rank's local shards (one
    ``[E, *shard_shape]`` tensor per weight); ``wait()`` returns the ``[N, m, W]`` shards of
    this rank's materialized experts (shard r at ``[r]``). ``received_bytes``: what this rank
    receives from the others. (Its own shards go through the exchange too, as a local copy: the
    output is then the ``[N, m, W]`` buffer itself, with no reassembly.) ``what`` names it in
    the activity record."""

    def __init__(
        self,
        shards: list[Tensor],
        layout: ShardLayout,
        members: Membership,
        group: Any,
        what: str = "fssdp expert gather",
    ) -> None:
        N, m, W = members.num_ranks, int(members.mine.numel()), layout.width
        # to each rank q: my shard of every expert q materializes, in q's expert order
        send = layout.pack(shards, torch.cat(members.experts))
        recv = [m] * N
        self.received_bytes = (N - 1) * m * W * send.element_size()
        self.N, self.m, self.W = N, m, W
        self.exchange = _Exchange(send, members.counts(), recv, group, what)

    def wait(self) -> Tensor:
        return self.exchange.wait().view(self.N, self.m, self.W)


class PendingReduce:
    """A SparseReduceScatter in flight: issued on construction from the gradient pieces
    ``[N, m, W]`` of this rank's materialized experts (piece r = F-slice r); ``wait()`` returns
    this rank's shard gradient of each weight (``[E, *shard_shape]``). ``sent_bytes``: what this
    rank sends to the others (its own piece goes through the exchange as a local copy)."""

    def __init__(
        self,
        pieces_NmW: Tensor,
        layout: ShardLayout,
        members: Membership,
        num_experts: int,
        group: Any,
    ) -> None:
        N, m, W = pieces_NmW.shape
        self.sent_bytes = (N - 1) * m * W * pieces_NmW.element_size()
        self.layout, self.members, self.num_experts = layout, members, num_experts
        self.exchange = _Exchange(
            pieces_NmW.reshape(N * m, W),
            [m] * N,
            members.counts(),
            group,
            "fssdp expert grad reduce",
        )

    def wait(self) -> list[Tensor]:
        received = self.exchange.wait()  # rank q's pieces for its experts, q = 0, 1, ...
        layout = self.layout
        grads = [received.new_zeros(self.num_experts, *shape) for shape in layout.shard_shapes]
        offset = 0
        for ids in self.members.experts:  # fixed order over the senders: a deterministic sum
            n = int(ids.numel())
            if n:
                rows = received[offset : offset + n]
                for g, part, shape in zip(grads, rows.split(layout.sizes, 1), layout.shard_shapes):
                    # ids are distinct: each element gets one addition per sender, in rank order
                    g.index_add_(0, ids, part.view(n, *shape))
            offset += n
        return grads
