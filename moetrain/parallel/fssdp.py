"""Fully sharded sparse data parallelism (FSSDP, Hecate) for the routed experts.

Legend: N ranks of the FSSDP group (the ranks of one pipeline stage), E experts (global), m
experts this rank materializes in a call, T local tokens, R rows, D model dim, F expert hidden
dim.

Storage (``apply_fssdp``): each routed-expert weight is a DTensor sharded on F over the group
(``Shard(1)`` for ``w1_EFD``/``w3_EFD``, ``Shard(2)`` for ``w2_EDF``): every rank holds 1/N of
every expert, of its gradient and of its optimizer state. Distributed checkpoints store global
shapes, so they load at expert-parallel layouts and back.

Each MoE call (``FSSDPDispatcher.run``), on every rank of the group:

1. sort the kept assignments by expert (as every dispatcher) and all-gather the rows per expert
   (N x E integers);
2. plan (``moetrain.parallel.fssdp_plan``): which ranks materialize which experts and which rows
   each computes — every rank derives the same plan;
3. SparseAllGather the planned experts' shards (``moetrain.parallel.fssdp_comm``) while the rows
   travel to the rank that computes them (both exchanges in flight together);
4. run the grouped GEMM over the m materialized experts, send the rows back, combine them with
   the router weights on the rank they came from;
5. with ``rematerialize`` (Hecate-RM) free the materialized weights after the forward and gather
   them again at the start of the backward.

Backward: the output gradients travel to the computing ranks (while the weights are gathered
again), the experts' backward runs, then the rows' gradients travel back while
SparseReduceScatter sums the weight gradients into the shards (zero for experts no rank used).

The result equals the single-process layer on each rank's micro-batch, and each shard's
gradient the single-process gradient summed over all ranks' micro-batches (to float rounding:
an expert's gradient is summed over its replicas).

Autograd structure: one Function, called inside ``GroupedExperts.forward`` (its ``chunked``
callback, as the overlapped EP dispatcher) with the local shards. Its forward runs the experts on
detached inputs under ``enable_grad`` — a small graph whose saved tensors bypass outer hooks such
as activation checkpointing's — and its backward runs that graph with ``torch.autograd.grad``
between the collectives, so the sequence of collectives is the same on every rank. The
materialized weights live in one flat buffer whose views the graph saves; rematerialization
frees it the way FSDP does (storage resized to 0, later resized back and refilled through a
separate alias of the storage, leaving the saved views' version counters untouched).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from moetrain.moe.dispatcher import ExpertsFn, Routing, expert_order, expert_rows
from moetrain.moe.experts import EXPERT_WEIGHTS
from moetrain.moe.layer import MoELayer, recomputing
from moetrain.ops import permute, unpermute
from moetrain.parallel.activity import collective, group_label
from moetrain.parallel.ep_comm import FlatAllToAll, Splits, segment_order
from moetrain.parallel.fssdp_comm import (
    Membership,
    PendingGather,
    PendingReduce,
    ShardLayout,
)
from moetrain.parallel.fssdp_plan import DEFAULT_SLACK, Placement, PlanStats, plan_placement
from moetrain.torch_compat import all_gather_single

ExpertCompute = Callable[..., Tensor]  # (rows_RD, tokens_per_expert_m, w1, w3, w2) -> out_RD


@dataclass(frozen=True)
class FSSDPOptions:
    """``rematerialize``: free the gathered weights after the forward, gather them again for the
    backward (less memory, one more SparseAllGather); ``slack``: the planner's balance tolerance
    (a rank may compute up to ``(1 + slack)`` x the mean rows)."""

    rematerialize: bool = True
    slack: float = DEFAULT_SLACK

    def __post_init__(self) -> None:
        if self.slack < 0:
            raise ValueError(f"parallel.fssdp_slack must be >= 0, got {self.slack}")


@dataclass
class CommBytes:
    """Bytes one MoE call moved between this rank and the others, by collective: ``gather``
    received by the SparseAllGather, ``regather`` received again in backward
    (rematerialization), ``reduce`` sent by the SparseReduceScatter, ``tokens`` rows sent to
    other ranks (dispatch, combine and their gradients), ``counts`` the count all-gather."""

    counts: int = 0
    gather: int = 0
    regather: int = 0
    reduce: int = 0
    tokens: int = 0

    @property
    def total(self) -> int:
        return self.counts + self.gather + self.regather + self.reduce + self.tokens


def _keep(t: Tensor) -> Tensor:
    return t


def _unpermute_rows(rows: Tensor, order: Tensor) -> Tensor:
    """Inverse of ``rows_in.index_select(0, order)``: ``out[order[k]] = rows[k]``."""
    return torch.empty_like(rows).index_copy_(0, order, rows)


def _rows_sent(x: Tensor, splits: Splits, me: int) -> int:
    return (sum(splits.send) - splits.send[me]) * x[:1].numel() * x.element_size()


@dataclass
class _Materialized:
    """The full weights of this rank's m experts: one flat buffer, and the views of it the
    experts compute with (autograd leaves when a graph is built), one per weight present."""

    flat: Tensor
    leaves: list[Tensor]


class _Step:
    """One MoE call: its plan, the index tensors derived from it, and the state the autograd
    Function's forward leaves for its backward."""

    def __init__(
        self, plan: Placement, group: Any, options: FSSDPOptions, device: torch.device
    ) -> None:
        self.comm = FlatAllToAll(group, "fssdp")
        self.group, self.options = group, options
        me = self.me = self.comm.rank
        self.num_experts = plan.num_experts
        self.members = Membership.of(plan.holds_EQ, me, device)
        mine = plan.experts_on(me)
        send_EQ = plan.rows_PEQ[me]  # my rows of expert e computed on rank q
        recv_Pm = plan.rows_PEQ[:, mine, me]  # rows of rank p for my materialized experts
        self.splits = Splits(send_EQ.sum(0).tolist(), recv_Pm.sum(1).tolist())
        # the layer's rows come sorted by expert: (expert, rank) -> (rank, expert) order
        self.send_order = segment_order(send_EQ).to(device)
        self.expert_order = segment_order(recv_Pm).to(device)  # (source, expert) -> (expert, src)
        self.counts_m = recv_Pm.sum(0)  # CPU: the grouped GEMM's split sizes
        self.bytes = CommBytes()
        self.rows_need_grad = False
        self.shards: list[Tensor] = []  # this rank's shards of the weights present
        self.present: list[int] = []  # which of (w1, w3, w2) they are
        self.layout: ShardLayout | None = None
        self.weights: _Materialized | None = None
        self.graph: tuple[Tensor, Tensor] | None = None

    @property
    def m(self) -> int:
        return int(self.counts_m.numel())

    def chunked(
        self, rows_RD: Tensor, compute: ExpertCompute, weights: tuple[Tensor | None, ...]
    ) -> Tensor:
        """``GroupedExperts.forward``'s ``chunked`` callback: runs inside the experts' forward
        with the local shards."""
        needs_grad = rows_RD.requires_grad or any(
            w is not None and w.requires_grad for w in weights
        )
        build_graph = torch.is_grad_enabled() and needs_grad
        self.rows_need_grad = rows_RD.requires_grad
        return _SparseExperts.apply(rows_RD, self, compute, build_graph, *weights)

    # --- the sparse collectives and the materialized weights ---------------------------------

    def _gather(self, what: str = "fssdp expert gather") -> PendingGather:
        assert self.layout is not None
        pending = PendingGather(self.shards, self.layout, self.members, self.group, what)
        return pending

    def _materialize(self, pieces_NmW: Tensor, build_graph: bool) -> list[Tensor | None]:
        assert self.layout is not None
        layout, m = self.layout, self.m
        flat = pieces_NmW.new_empty(m * layout.width * layout.num_ranks)
        views = self._views(flat)
        layout.assemble(pieces_NmW, views)
        leaves = []
        for view, shard in zip(views, self.shards):
            leaves.append(view.requires_grad_(build_graph and shard.requires_grad))
        self.weights = _Materialized(flat, leaves)
        full: list[Tensor | None] = [None, None, None]
        for i, leaf in zip(self.present, leaves):
            full[i] = leaf
        return full

    def _views(self, flat: Tensor) -> list[Tensor]:
        assert self.layout is not None
        out, offset = [], 0
        for i in range(len(self.layout.sizes)):
            shape = self.layout.full_shape(i, self.m)
            n = int(torch.Size(shape).numel())
            out.append(flat[offset : offset + n].view(shape))
            offset += n
        return out

    def _release(self) -> None:
        if self.weights is not None:
            self.weights.flat.untyped_storage().resize_(0)

    def _refill(self, pieces_NmW: Tensor) -> None:
        """Rematerialize into the freed buffer; writes go through an alias of its storage so the
        version counters of the views the graph saved do not move."""
        assert self.weights is not None and self.layout is not None
        flat = self.weights.flat
        storage = flat.untyped_storage()
        storage.resize_(flat.numel() * flat.element_size())
        alias = flat.new_empty(0).set_(storage, flat.storage_offset(), flat.shape, flat.stride())
        self.layout.assemble(pieces_NmW, self._views(alias))

    # --- forward and backward ----------------------------------------------------------------

    def forward(
        self, sent_RD: Tensor, compute: ExpertCompute, build_graph: bool, weights: list
    ) -> Tensor:
        self.present = [i for i, w in enumerate(weights) if w is not None]
        self.shards = [weights[i] for i in self.present]
        f_dims = [EXPERT_WEIGHTS[i][1] - 1 for i in self.present]
        self.layout = ShardLayout.of(self.shards, f_dims, self.comm.size)
        gather = self._gather()
        self.bytes.gather += gather.received_bytes
        # rows for rank q leave from its segment of the (rank, expert)-ordered input; rows from
        # rank p land in (source, expert) order
        rows = self.comm.start(sent_RD, self.splits, "fssdp dispatch")
        self.bytes.tokens += _rows_sent(sent_RD, self.splits, self.me)
        full = self._materialize(gather.wait(), build_graph)
        received = rows.wait().index_select(0, self.expert_order)
        out = self._compute(compute, received, full, build_graph)
        back = _unpermute_rows(out, self.expert_order)  # -> (source, expert) order
        # each row back to its source
        returned = self.comm.start(back, self.splits.reversed(), "fssdp combine")
        self.bytes.tokens += _rows_sent(back, self.splits.reversed(), self.me)
        combined = returned.wait()
        if not build_graph or self.options.rematerialize:
            self._release()
        if not build_graph:
            self.weights = None
        return combined

    def _compute(
        self, compute: ExpertCompute, rows: Tensor, full: list[Tensor | None], build_graph: bool
    ) -> Tensor:
        if self.m == 0:  # nothing to compute here this call
            return rows.new_zeros(0, rows.shape[-1])
        if not build_graph:
            return compute(rows, self.counts_m, *full)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            leaf = rows.requires_grad_(self.rows_need_grad)
            out = compute(leaf, self.counts_m, *full)
        self.graph = (leaf, out)
        return out.detach()

    def backward(self, grad_RD: Tensor, rows_need_grad: bool) -> tuple[Tensor | None, list]:
        if self.weights is None:  # before any collective is issued
            raise RuntimeError(
                "backward through an FSSDP MoE layer twice (retain_graph=True) is not supported"
            )
        assert self.layout is not None
        rows_need_grad = rows_need_grad and self.rows_need_grad
        # the output gradient travels the way the rows came
        g_out = self.comm.start(grad_RD, self.splits, "fssdp combine grad")
        self.bytes.tokens += _rows_sent(grad_RD, self.splits, self.me)
        regather = None
        if self.options.rematerialize:
            regather = self._gather("fssdp expert regather")
            self.bytes.regather += regather.received_bytes
        g_rows = g_out.wait().index_select(0, self.expert_order)
        if regather is not None:
            self._refill(regather.wait())
        grad_leaf, grad_full = self._experts_backward(g_rows, rows_need_grad)
        self._release()  # the materialized weights are no longer needed
        self.weights = None
        returned = None
        if grad_leaf is not None:
            back = _unpermute_rows(grad_leaf, self.expert_order)
            # the rows' gradients go back to the ranks the rows came from
            returned = self.comm.start(back, self.splits.reversed(), "fssdp dispatch grad")
            self.bytes.tokens += _rows_sent(back, self.splits.reversed(), self.me)
        shard_grads: list[Tensor | None] = [None, None, None]
        if any(s.requires_grad for s in self.shards):
            pieces = self.layout.scatter(grad_full, self.m, grad_RD)
            del grad_full
            reduce = PendingReduce(pieces, self.layout, self.members, self.num_experts, self.group)
            self.bytes.reduce += reduce.sent_bytes
            for i, g, shard in zip(self.present, reduce.wait(), self.shards):
                shard_grads[i] = g if shard.requires_grad else None
        rows_grad = returned.wait() if returned is not None else None
        return rows_grad, shard_grads

    def _experts_backward(
        self, g_rows: Tensor, rows_need_grad: bool
    ) -> tuple[Tensor | None, list[Tensor | None]]:
        """(gradient of the received rows, or None when not needed; gradient of each present
        full weight, or None)."""
        assert self.weights is not None
        graph, self.graph = self.graph, None
        leaves = self.weights.leaves
        if graph is None:  # m == 0: no graph was built, nothing was computed here
            return (torch.zeros_like(g_rows) if rows_need_grad else None), [None] * len(leaves)
        leaf, out = graph
        wanted = [w for w in leaves if w.requires_grad]
        inputs = ([leaf] if rows_need_grad else []) + wanted
        grads = list(torch.autograd.grad(out, inputs, g_rows, allow_unused=True))
        grad_leaf = None
        if rows_need_grad:
            grad_leaf = grads.pop(0)
            if grad_leaf is None:
                grad_leaf = torch.zeros_like(leaf)
        by_leaf = iter(grads)
        return grad_leaf, [next(by_leaf) if w.requires_grad else None for w in leaves]


class _SparseExperts(torch.autograd.Function):
    """Materialize, exchange rows, compute, return rows (see the module docstring). Inputs:
    the rows in (destination rank, expert) order and the local shards; output: the experts'
    output rows in the same order."""

    @staticmethod
    def forward(
        ctx: Any,
        sent_RD: Tensor,
        step: _Step,
        compute: ExpertCompute,
        build_graph: bool,
        w1: Tensor,
        w3: Tensor | None,
        w2: Tensor,
    ) -> Tensor:
        ctx.step = step
        return step.forward(sent_RD, compute, build_graph, [w1, w3, w2])

    @staticmethod
    def backward(ctx: Any, grad_RD: Tensor):
        rows_grad, (g1, g3, g2) = ctx.step.backward(grad_RD, bool(ctx.needs_input_grad[0]))
        return rows_grad, None, None, None, g1, g3, g2


class FSSDPDispatcher:
    """The MoE layer's dispatcher under FSSDP: ``run`` plans, materializes and computes (module
    docstring). Every rank of ``group`` calls ``run`` together (the exchanges are collective).

    After each call ``last_plan`` holds the plan's statistics and ``last_bytes`` the bytes this
    rank moved (its backward adds to it); with ``stats_log`` a list, every training call's plan
    statistics are appended (not a recomputation under activation checkpointing, not a call
    without gradients), and with ``bytes_log`` a list every call's ``CommBytes``.
    """

    def __init__(self, num_experts: int, group: Any, options: FSSDPOptions | None = None) -> None:
        self.num_experts = num_experts
        self.group = group
        self.options = options or FSSDPOptions()
        self.size = dist.get_world_size(group)
        self.last_plan: PlanStats | None = None
        self.last_bytes: CommBytes | None = None
        self.stats_log: list[PlanStats] | None = None
        self.bytes_log: list[CommBytes] | None = None
        self._last_step: _Step | None = None

    @property
    def materialized_bytes(self) -> int:
        """Bytes of gathered expert weights the last call holds now (0 once freed: after its
        backward, or after its forward with ``rematerialize``)."""
        step = self._last_step
        if step is None or step.weights is None:
            return 0
        return step.weights.flat.untyped_storage().nbytes()

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("FSSDPDispatcher runs the experts itself: call run()")

    def combine(self, expert_output_RD: Tensor) -> Tensor:
        raise NotImplementedError("FSSDPDispatcher runs the experts itself: call run()")

    def plan(self, tokens_per_expert_E: Tensor, device: torch.device) -> tuple[Placement, int]:
        """Every rank's rows per expert (one all-gather, then the layer's one host sync) -> the
        placement; also returns the bytes this rank sent."""
        local = tokens_per_expert_E.to(device=device, dtype=torch.long)
        every = local.new_empty(self.size * local.numel())
        with collective("all_gather", "fssdp counts", group_label(self.group, "fssdp")):
            all_gather_single(every, local, group=self.group)
            counts_PE = every.view(self.size, -1).cpu()  # host sync: the plan decides every split
        sent = (self.size - 1) * local.numel() * local.element_size()
        return plan_placement(counts_PE, self.options.slack), sent

    def run(
        self,
        x_TD: Tensor,
        routing: Routing,
        experts: ExpertsFn,
        overlap_fn: Callable[[], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """plan -> materialize and compute (``experts`` is a ``GroupedExperts`` whose weights are
        this rank's shards) -> weighted combine; then ``overlap_fn`` (the shared experts)."""
        ordered = expert_order(routing, self.num_experts)
        C = routing.pad_to_capacity
        sent_E = ordered.counts_E if C is None else torch.full_like(ordered.counts_E, C)
        plan, count_bytes = self.plan(sent_E, x_TD.device)
        # the plan's counts are on the host: this rank's give the kept rows without another sync
        kept_E = plan.rows_PEQ[dist.get_rank(self.group)].sum(-1)
        rows = expert_rows(routing, ordered, kept_E.tolist())
        step = _Step(plan, self.group, self.options, x_TD.device)
        step.bytes.counts = count_bytes
        # rows in the exchange's (destination rank, expert) order from the start: one gather
        row_token_R = rows.row_token_R.index_select(0, step.send_order)
        row_weight_R = rows.row_weight_R.index_select(0, step.send_order)
        sent_RD = permute(x_TD, row_token_R)
        out_RD = experts(sent_RD, None, chunked=step.chunked)
        y_TD = unpermute(out_RD, row_token_R, row_weight_R, x_TD.shape[0])
        self.last_plan, self.last_bytes, self._last_step = plan.stats(), step.bytes, step
        if torch.is_grad_enabled() and not recomputing():
            if self.stats_log is not None:
                self.stats_log.append(self.last_plan)
            if self.bytes_log is not None:
                self.bytes_log.append(step.bytes)
        return y_TD, overlap_fn() if overlap_fn is not None else None


def apply_fssdp(layer: MoELayer, mesh: DeviceMesh, options: FSSDPOptions | None = None) -> None:
    """Shard ``layer``'s routed experts on F over the 1-D ``mesh`` (the FSSDP group) and make
    it dispatch through :class:`FSSDPDispatcher`. Every weight's F must divide by the group
    size (checked before any process group starts by ``ParallelDims.validate_model``)."""
    experts = layer.experts
    N = mesh.size()
    if layer.cfg.hidden_dim % N:
        raise ValueError(
            f"parallel.expert_sharding=fssdp: {N} ranks do not divide model.moe.hidden_dim="
            f"{layer.cfg.hidden_dim}"
        )
    for name, f_dim in EXPERT_WEIGHTS:
        weight = getattr(experts, name)
        if weight is None:
            continue
        sharded = distribute_tensor(weight.data, mesh, [Shard(f_dim)], src_data_rank=None)
        experts.register_parameter(name, nn.Parameter(sharded))
    layer.dispatcher = FSSDPDispatcher(layer.cfg.num_experts, mesh.get_group(), options)
