"""How expert-parallel rows travel: one flat all-to-all, or a two-stage (hierarchical) one.

Legend: P EP ranks, E experts (global), e = E/P local experts, R rows, D model dim, N nodes an
EP group spans, L EP ranks per node (P = N x L). EP rank p sits on node ``p // L`` at local
index ``p % L`` (checked by ``ParallelDims.ep_node_layout`` before any process group starts).

Both exchanges implement one contract, that of ``all_to_all_single`` over the EP group: the
input holds the rows for EP rank 0, then for rank 1, ... (``splits.send[p]`` rows each); the
output holds the rows from rank 0, then from rank 1, ... (``splits.recv[p]`` rows each), every
segment in the order its sender had it. ``start`` issues the exchange and returns a handle whose
``wait`` returns the output, so callers can compute while rows are in flight. ``start``'s
``what`` names the exchange (``ep dispatch``, ...) for ``moetrain.parallel.activity``, which
records every wait (and the count exchanges) with the collective and its group.

``HierarchicalAllToAll`` moves rows inter-node first: rank (a, i) sends everything bound for
node b to its peer (b, i) (the "peer" group of local index i: one rank per node), then each
rank forwards inside its node to the destination (a, j) (the "node" group). Inter-node traffic
therefore only ever flows between peers, and each rank talks to N - 1 remote ranks instead of
P - L. Both stages only move rows, so the result is bit-identical to the flat exchange.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from moetrain.parallel.activity import collective, group_label


@dataclass(frozen=True)
class Splits:
    """Rows of one exchange: ``send[p]`` to EP rank p, ``recv[p]`` from EP rank p, and (for the
    hierarchical exchange, which forwards other ranks' rows) ``full_PP[s, d]``, the rows EP rank
    s sends to EP rank d, the same on every rank (CPU int64)."""

    send: list[int]
    recv: list[int]
    full_PP: Tensor | None = None

    def reversed(self) -> Splits:
        """The exchange that sends every row back where it came from."""
        full = None if self.full_PP is None else self.full_PP.t()
        return Splits(self.recv, self.send, full)


@dataclass(frozen=True)
class HostCounts:
    """One layer call's row counts, on the host after the exchange's single host sync:
    ``send_Pe`` rows this rank sends per (destination rank, local expert), ``recv_Pe`` rows it
    receives per (source rank, local expert), and ``full_PE`` (hierarchical only) every rank's
    rows per global expert. The gradient exchanges of backward reuse them: no second exchange."""

    send_Pe: Tensor
    recv_Pe: Tensor
    full_PE: Tensor | None = None


class Pending(Protocol):
    def wait(self) -> Tensor: ...


class EPExchange(Protocol):
    """What the all-to-all dispatchers need from an exchange (``FlatAllToAll`` or
    ``HierarchicalAllToAll``)."""

    size: int  # P
    rank: int  # this rank's EP rank

    def exchange_counts(self, send_Pe: Tensor) -> HostCounts: ...

    def start(self, x_RD: Tensor, splits: Splits, what: str = "ep exchange") -> Pending: ...


def segment_order(counts_AB: Tensor) -> Tensor:
    """Row permutation that regroups rows stored as A x B segments (A-major, segment (a, b) of
    ``counts_AB[a, b]`` rows) into B-major order, each segment's rows kept in order:
    ``result[i]`` = source row of output row i."""
    flat = counts_AB.flatten().long()
    A, B = counts_AB.shape
    segment = torch.repeat_interleave(torch.arange(A * B), flat)
    key = (segment % B) * A + segment // B  # (b, a): B-major
    return torch.sort(key, stable=True).indices


class _Ready:
    def __init__(self, out: Tensor) -> None:
        self.out = out

    def wait(self) -> Tensor:
        return self.out


class _InFlight:
    """One async ``all_to_all_single``; keeps its input alive until it completes. ``what`` and
    ``label`` name it while a rank waits for it (``moetrain.parallel.activity``)."""

    def __init__(self, work: Any, out: Tensor, keep: Tensor, what: str, label: str) -> None:
        self.work, self.out = work, out
        self.keep: Tensor | None = keep
        self.what, self.label = what, label

    def wait(self) -> Tensor:
        with collective("all_to_all", self.what, self.label):
            self.work.wait()  # CPU: blocks; NCCL: the current stream waits for NCCL's stream
        self.keep = None
        return self.out


def _issue(
    x_RD: Tensor, send: list[int], recv: list[int], group: Any, what: str, label: str
) -> _InFlight:
    x = x_RD.contiguous()
    out = x.new_empty(sum(recv), *x.shape[1:])
    # rows x[sum(send[:r]) : ...] go to group rank r; rows from group rank r land at recv[r]
    work = dist.all_to_all_single(out, x, recv, send, group=group, async_op=True)
    return _InFlight(work, out, x, what, label)


class FlatAllToAll:
    """One ``all_to_all_single`` over the whole EP group (``name`` names the group in the
    activity record: ``ep``, or ``fssdp`` when FSSDP moves its rows through it)."""

    def __init__(self, group: Any, name: str = "ep") -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.label, self.counts_what = group_label(group, name), f"{name} counts"

    def exchange_counts(self, send_Pe: Tensor) -> HostCounts:
        """Rows per (destination rank, local expert) -> rows per (source rank, local expert);
        ``send_Pe`` on the rows' device, both returned on the host."""
        recv_Pe = torch.empty_like(send_Pe)
        with collective("all_to_all", self.counts_what, self.label):
            # counts travel on the rows' device (NCCL needs device tensors, gloo takes CPU ones)
            dist.all_to_all_single(recv_Pe, send_Pe, group=self.group)
            # host sync: the split sizes of the row exchange, both directions in one copy
            both = torch.stack([send_Pe, recv_Pe]).cpu()
        return HostCounts(both[0], both[1])

    def start(self, x_RD: Tensor, splits: Splits, what: str = "ep exchange") -> Pending:
        return _issue(x_RD, splits.send, splits.recv, self.group, what, self.label)


@dataclass
class NodeGroups:
    """This rank's two sub-groups of its EP group: ``node`` (the L EP ranks on its node, in EP
    order) and ``peers`` (the N EP ranks at its local index, one per node, in node order)."""

    node: Any
    peers: Any
    num_nodes: int
    per_node: int


def build_node_groups(ep_groups: list[list[int]], per_node: int) -> NodeGroups:
    """Create the node and peer groups of every EP group (global ranks in EP order; EP rank p
    on node ``p // per_node``). Collective: every rank of the default group calls it with the
    same arguments (``dist.new_group`` for every group, members or not)."""
    me = dist.get_rank()
    mine: dict[str, Any] = {}
    num_nodes = len(ep_groups[0]) // per_node
    for members in ep_groups:
        if members != sorted(members):  # group ranks follow global rank order
            raise ValueError(f"EP group {members} is not in increasing rank order")
        by_node = [members[a * per_node : (a + 1) * per_node] for a in range(num_nodes)]
        by_local = [members[i::per_node] for i in range(per_node)]
        for kind, lists in (("node", by_node), ("peers", by_local)):
            for ranks in lists:
                group = dist.new_group(ranks)
                if me in ranks:
                    mine[kind] = group
    return NodeGroups(mine["node"], mine["peers"], num_nodes, per_node)


class _TwoStage:
    """A hierarchical exchange between its stages: the inter-node stage is in flight."""

    def __init__(
        self,
        owner: HierarchicalAllToAll,
        first: Pending,
        counts1: Tensor,
        splits: Splits,
        what: str,
    ) -> None:
        self.owner, self.first, self.counts1, self.splits = owner, first, counts1, splits
        self.what = what

    def wait(self) -> Tensor:
        return self.owner._finish(self.first.wait(), self.counts1, self.splits, self.what)


class HierarchicalAllToAll:
    """Inter-node stage over the peer group, then intra-node stage over the node group (module
    docstring). ``start`` issues the inter-node stage asynchronously; ``wait`` finishes it and
    runs the intra-node one (on GPUs: the fast link)."""

    def __init__(self, groups: NodeGroups, ep_rank: int) -> None:
        self.groups = groups
        self.N, self.L = groups.num_nodes, groups.per_node
        self.size, self.rank = self.N * self.L, ep_rank
        self.node, self.local = divmod(ep_rank, self.L)
        self.node_label = group_label(groups.node, "ep node")
        self.peers_label = group_label(groups.peers, "ep peer")

    def exchange_counts(self, send_Pe: Tensor) -> HostCounts:
        """Every rank learns every rank's rows per global expert (``full_PE``, needed to forward
        other ranks' rows): gathered inside the node, then across peers."""
        counts_E = send_Pe.flatten().contiguous()
        # flat buffers (gloo wants the output as input-shaped pieces, i.e. 1-D here)
        node_LE = counts_E.new_empty(self.L * counts_E.numel())
        with collective("all_gather", "ep counts", self.node_label):
            dist.all_gather_into_tensor(node_LE, counts_E, group=self.groups.node)
        full_NLE = node_LE.new_empty(self.N * node_LE.numel())
        with collective("all_gather", "ep counts", self.peers_label):
            dist.all_gather_into_tensor(full_NLE, node_LE, group=self.groups.peers)
            # host sync: every split size of both stages (this rank's sends included)
            full_PE = full_NLE.view(self.size, -1).cpu()
        e = full_PE.shape[1] // self.size
        recv_Pe = full_PE[:, self.rank * e : (self.rank + 1) * e]
        send_Pe = full_PE[self.rank].view(self.size, e)
        return HostCounts(send_Pe, recv_Pe.contiguous(), full_PE)

    def start(self, x_RD: Tensor, splits: Splits, what: str = "ep exchange") -> Pending:
        if splits.full_PP is None:
            raise ValueError("the hierarchical all-to-all needs Splits.full_PP")
        M = splits.full_PP.reshape(self.N, self.L, self.N, self.L)
        a, i = self.node, self.local
        # stage 1: rows for node b (already node-major: EP order) go to peer (b, i);
        # from peer (b', i) come its rows for (a, j), j = 0..L-1, in that order
        send1 = M[a, i].sum(1).tolist()
        counts1_NL = M[:, i, a, :]
        if self.N == 1:
            return _TwoStage(self, _Ready(x_RD), counts1_NL, splits, what)
        recv1 = counts1_NL.sum(1).tolist()
        first = _issue(x_RD, send1, recv1, self.groups.peers, what, self.peers_label)
        return _TwoStage(self, first, counts1_NL, splits, what)

    def _finish(self, stage1_RD: Tensor, counts1_NL: Tensor, splits: Splits, what: str) -> Tensor:
        assert splits.full_PP is not None
        M = splits.full_PP.reshape(self.N, self.L, self.N, self.L)
        a, i = self.node, self.local
        # (source node b', destination local j) -> (j, b'): one segment per node-group rank
        by_dest = stage1_RD.index_select(0, segment_order(counts1_NL).to(stage1_RD.device))
        # stage 2 inside node a: rows for (a, j) go to j; from (a, i') come rows of sources
        # (b', i') for every b', node-ordered
        counts2_LN = M[:, :, a, i].t()
        if self.L > 1:
            send2 = counts1_NL.sum(0).tolist()
            recv2 = counts2_LN.sum(1).tolist()
            by_dest = _issue(by_dest, send2, recv2, self.groups.node, what, self.node_label).wait()
        # (i', b') -> (b', i') = EP rank order of the sources
        return by_dest.index_select(0, segment_order(counts2_LN).to(by_dest.device))
