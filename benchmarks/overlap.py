"""Overlapped all-to-all benchmark: the MoE layer's forward+backward at EP=4 on a simulated
cluster (2 nodes x 2 processes) with the overlap off / on / on + 2-D, beside its exchanges alone
and its experts alone (docs/benchmarks.md, "Overlapped all-to-all", defines every figure).

Legend: P EP ranks (the world), L ranks per node, E experts, e = E/P local experts, K top-k,
T tokens per rank, D model dim, F expert hidden dim, R rows.

Variants: ``flat_c1`` = T_serial (unchunked flat all-to-all); ``flat_cN`` / ``hier_cN``: N
chunks, flat or hierarchical (2-D); ``comm_only`` = T_comm (the step's four row exchanges with the
layer's splits, flat, one after the other); ``compute_only`` = T_compute (the local experts'
forward+backward on the rows this rank receives); ``no_comm`` (the layer with all E experts on
this rank's tokens, no exchange). Overlap efficiency = (T_serial - T_overlap) / min(T_comm,
T_compute). A time is the median over repeats of the slowest rank's time (a barrier before each
repeat; the variants take turns within a repeat so that drift hits them alike).

Bytes: one untimed step of each variant runs with ``dist.all_to_all_single`` wrapped, counting
the row bytes leaving each rank for another rank (self-sends excluded), summed over ranks; the
int64 count exchanges are left out. ``min_bytes`` = 4 exchanges x routed rows x D x dtype bytes
(the issue's minimum: it includes rows whose expert is on their own rank); ``remote_min_bytes``
and ``inter_node_min_bytes`` count only rows whose expert is on another rank / node.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from benchmarks.common import (
    LayerShape,
    add_shape_options,
    reduce_over_ranks,
    run_on_sim_cluster,
    shape_args,
    shape_from,
    slowest_rank,
    time_round_robin,
)
from moetrain.moe import MoELayer
from moetrain.moe.dispatcher import Routing, sort_by_expert
from moetrain.moe.experts import GroupedExperts
from moetrain.parallel.ep import AllToAllDispatcher
from moetrain.parallel.ep_comm import (
    EPExchange,
    FlatAllToAll,
    HierarchicalAllToAll,
    Splits,
    build_node_groups,
)

EXCHANGES_PER_STEP = 4  # dispatch, combine (forward); their gradients (backward)


@dataclass(frozen=True)
class Shape(LayerShape):
    """The layer (fp32, dropless, SwiGLU); ``tokens`` per rank.

    The default makes the exchanges at 1 Gbit/s take ~3x the expert compute (4 processes on
    2 cores): the forward carries two exchanges per GEMM pass and the backward two per two
    passes, so only when each phase's exchanges outlast its GEMMs can all of the smaller term be
    hidden (docs/benchmarks.md); 4 MB of rows per rank per exchange keeps a step under 0.6 s.
    """

    dim: int = 512
    hidden_dim: int = 128
    tokens: int = 2048


# --- analysis (pure) --------------------------------------------------------------------------


def overlap_efficiency(t_serial: float, t_overlap: float, t_comm: float, t_compute: float) -> float:
    """(T_serial - T_overlap) / min(T_comm, T_compute): the share of the smaller of communication
    and compute that overlapping hides."""
    bound = min(t_comm, t_compute)
    if bound <= 0:
        raise ValueError(f"min(T_comm, T_compute) must be positive, got {bound}")
    return (t_serial - t_overlap) / bound


def sent_bytes(
    group_ranks: Sequence[int], send_rows: Sequence[int], me: int, row_bytes: int, per_node: int
) -> tuple[int, int]:
    """Bytes one ``all_to_all_single`` call sends from global rank ``me``: ``send_rows[i]`` rows
    of ``row_bytes`` to global rank ``group_ranks[i]``. Returns (to other ranks, to other nodes);
    rows to ``me`` itself are not counted (they never leave the process)."""
    node = me // per_node
    other = sum(n for r, n in zip(group_ranks, send_rows) if r != me)
    remote = sum(n for r, n in zip(group_ranks, send_rows) if r // per_node != node)
    return other * row_bytes, remote * row_bytes


def min_bytes(routed_rows: int, dim: int, dtype_bytes: int) -> int:
    """The issue's minimum per step: every routed row (D values) once per exchange, 4 exchanges."""
    return EXCHANGES_PER_STEP * routed_rows * dim * dtype_bytes


def routed_rows_by_place(
    tokens_per_expert_E: Tensor, rank: int, world: int, per_node: int
) -> dict[str, int]:
    """This rank's routed rows: all of them, those whose expert is on another rank, and those
    whose expert is on another node (EP rank p holds experts [p*e, (p+1)*e))."""
    by_rank = tokens_per_expert_E.view(world, -1).sum(1)
    node = rank // per_node
    on_node = by_rank[node * per_node : (node + 1) * per_node].sum()
    return {
        "routed": int(by_rank.sum()),
        "remote": int(by_rank.sum() - by_rank[rank]),
        "inter_node": int(by_rank.sum() - on_node),
    }


class CommProbe:
    """While active (``with``), wraps ``dist.all_to_all_single`` (and the hierarchical count
    gather): counts the row bytes each call sends from this rank (floating-point tensors only:
    the int64 count exchanges are left out) and the time this rank spends blocked in them
    (``waited``: a blocking call's duration, an async one's issue plus its ``wait()``)."""

    NAMES = ("all_to_all_single", "all_gather_into_tensor")

    def __init__(self, per_node: int) -> None:
        self.per_node = per_node
        self.sent = self.inter_node = 0
        self.waited = 0.0
        self._originals = {name: getattr(dist, name) for name in self.NAMES}

    def __enter__(self) -> CommProbe:
        a2a, gather = (self._originals[name] for name in self.NAMES)

        def all_to_all_single(output, input, out_splits=None, in_splits=None, **kw):
            self.record(input, in_splits, kw.get("group"))
            return self._timed(a2a, output, input, out_splits, in_splits, **kw)

        dist.all_to_all_single = all_to_all_single  # type: ignore[assignment]
        dist.all_gather_into_tensor = lambda *a, **kw: self._timed(gather, *a, **kw)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)

    def _timed(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        work = fn(*args, **kw)
        self.waited += time.perf_counter() - start
        return _TimedWork(work, self) if kw.get("async_op") else work

    def record(self, x: Tensor, send_rows: Sequence[int] | None, group: Any) -> None:
        if not x.is_floating_point() or x.shape[0] == 0:
            return
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        rows = list(send_rows) if send_rows else [x.shape[0] // len(ranks)] * len(ranks)
        row_bytes = x[0].numel() * x.element_size()
        other, remote = sent_bytes(ranks, rows, dist.get_rank(), row_bytes, self.per_node)
        self.sent += other
        self.inter_node += remote


class _TimedWork:
    def __init__(self, work: Any, probe: CommProbe) -> None:
        self.work, self.probe = work, probe

    def wait(self, *args: Any) -> Any:
        start = time.perf_counter()
        done = self.work.wait(*args)
        self.probe.waited += time.perf_counter() - start
        return done


def is_overlapped(variant: str) -> bool:
    """``flat_cN`` / ``hier_cN`` with N > 1 chunks."""
    kind, _, n = variant.partition("_c")
    return kind in ("flat", "hier") and n.isdigit() and int(n) > 1


def summarize(times: dict[str, float]) -> dict[str, Any]:
    """Efficiency of every layer variant but ``flat_c1`` against it, ``comm_only`` and
    ``compute_only`` (``hier_c1`` too: the 2-D exchange alone, not an overlap); the best
    overlapped one; where the serial time goes: ``rest_seconds`` = no_comm - compute_only
    (router, sort, permutes, autograd: the work outside the experts) and ``exposed_comm_seconds``
    = serial - no_comm (the communication the serial layer waits for)."""
    serial, comm, compute = times["flat_c1"], times["comm_only"], times["compute_only"]
    variants = [v for v in times if v.startswith(("flat_c", "hier_c")) and v != "flat_c1"]
    eff = {v: overlap_efficiency(serial, times[v], comm, compute) for v in variants}
    overlapped = [v for v in variants if is_overlapped(v)]
    best = max(overlapped, key=lambda v: eff[v]) if overlapped else None
    return {
        "efficiency": eff,
        "best_variant": best,
        "overlap_efficiency": eff[best] if best else None,
        # perfect overlap: the longer of the layer without exchanges and the exchanges alone
        "bound_seconds": max(comm, times["no_comm"]),
        "rest_seconds": times["no_comm"] - compute,
        "exposed_comm_seconds": serial - times["no_comm"],
    }


# --- measurement: one rank of the simulated cluster (collective) ------------------------------


def build_layer(shape: Shape, rank: int, world: int) -> MoELayer:
    """The layer with this rank's e experts (same router on every rank)."""
    torch.manual_seed(0)
    layer = MoELayer(shape.moe_config())
    layer.experts = GroupedExperts(layer.cfg, num_experts=shape.num_experts // world)
    torch.manual_seed(1 + rank)
    layer.experts.reset_parameters()
    return layer


def layer_step(layer: MoELayer, x_TD: Tensor, g_TD: Tensor) -> None:
    """One forward+backward of ``layer`` on ``x_TD`` with output gradient ``g_TD``."""
    x = x_TD.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    layer(x).backward(g_TD)


def comm_step(comm: EPExchange, splits: Splits, send_RD: Tensor) -> None:
    """The layer's four row exchanges, one after the other."""
    received = comm.start(send_RD, splits).wait()  # dispatch
    comm.start(received, splits.reversed()).wait()  # combine: rows go back
    grad = comm.start(send_RD, splits).wait()  # the combine's gradient travels as the dispatch
    comm.start(grad, splits.reversed()).wait()  # the dispatch's gradient, as the combine


def compute_step(experts: GroupedExperts, rows_RD: Tensor, counts_e: Tensor, g_RD: Tensor) -> None:
    """The local experts' forward+backward on ``rows_RD`` (``counts_e`` rows per expert)."""
    rows = rows_RD.detach().requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    experts(rows, counts_e).backward(g_RD)


def time_variants(
    steps: dict[str, Callable[[], None]], repeats: int, per_node: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median over ``repeats`` of the slowest rank's time of each step (the steps take turns,
    ``benchmarks.common.time_round_robin``), and the mean over ranks of the median time each
    rank spent blocked in its exchanges (``CommProbe.waited``)."""
    waited: dict[str, list[float]] = {name: [] for name in steps}

    def probed(name: str) -> Callable[[], None]:
        def step() -> None:
            with CommProbe(per_node) as probe:
                steps[name]()
            waited[name].append(probe.waited)

        return step

    rounds = slowest_rank(time_round_robin({name: probed(name) for name in steps}, repeats))
    times = {name: statistics.median(t) for name, t in rounds.items()}
    total = reduce_over_ranks([statistics.median(w) for w in waited.values()])
    return times, {name: w / dist.get_world_size() for name, w in zip(steps, total)}


def _all_sum(values: dict[str, int]) -> dict[str, int]:
    return dict(zip(values, reduce_over_ranks(list(values.values()), dtype=torch.int64)))


@dataclass
class Bench:
    """One rank's benchmark state: the layer, its input and output gradient, and the routing
    its exchanges would carry (``send_Pe``, ``recv_Pe``: rows per (rank, local expert))."""

    shape: Shape
    layer: MoELayer
    x_TD: Tensor
    g_TD: Tensor
    send_Pe: Tensor
    recv_Pe: Tensor
    gen: torch.Generator


def setup(shape: Shape) -> Bench:
    """This rank's ``Bench`` at ``shape`` (collective: exchanges the routing counts)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    layer = build_layer(shape, rank, world)
    gen = torch.Generator().manual_seed(100 + rank)
    x_TD = torch.randn(shape.tokens, shape.dim, generator=gen)
    g_TD = torch.randn(shape.tokens, shape.dim, generator=gen)
    with torch.no_grad():
        routed = layer.router(x_TD, None)
    rows = sort_by_expert(Routing(routed.topk_ids_TK, routed.topk_weights_TK), shape.num_experts)
    send_Pe = rows.tokens_per_expert_E.view(world, -1)
    recv_Pe = FlatAllToAll(None).exchange_counts(send_Pe).recv_Pe
    return Bench(shape, layer, x_TD, g_TD, send_Pe, recv_Pe, gen)


def layer_steps(b: Bench, chunks: Sequence[int], per_node: int) -> dict[str, Callable[[], None]]:
    """The layer's forward+backward with every dispatcher: ``flat_cN`` and ``hier_cN``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = build_node_groups([list(range(world))], per_node)

    def with_dispatcher(n: int, hierarchical: bool) -> Callable[[], None]:
        comm = HierarchicalAllToAll(groups, rank) if hierarchical else None
        dispatcher = AllToAllDispatcher(b.shape.num_experts, None, n, comm)

        def step() -> None:
            b.layer.dispatcher = dispatcher
            layer_step(b.layer, b.x_TD, b.g_TD)

        return step

    steps = {f"flat_c{n}": with_dispatcher(n, False) for n in (1, *chunks)}
    steps.update({f"hier_c{n}": with_dispatcher(n, True) for n in (1, *chunks)})
    return steps


def isolated_steps(b: Bench) -> dict[str, Callable[[], None]]:
    """``comm_only`` (the layer's four exchanges, flat), ``compute_only`` (its experts) and
    ``no_comm`` (the single-process layer with all E experts on this rank's tokens: the same
    work without any exchange)."""
    flat = FlatAllToAll(None)
    splits = Splits(b.send_Pe.sum(1).tolist(), b.recv_Pe.sum(1).tolist())
    send_RD = torch.randn(int(b.send_Pe.sum()), b.shape.dim, generator=b.gen)
    recv_RD = torch.randn(int(b.recv_Pe.sum()), b.shape.dim, generator=b.gen)
    g_RD = torch.randn_like(recv_RD)
    counts_e = b.recv_Pe.sum(0)
    torch.manual_seed(0)
    local = MoELayer(b.layer.cfg)  # all E experts here: this rank's tokens, the same FLOPs
    return {
        "comm_only": lambda: comm_step(flat, splits, send_RD),
        "compute_only": lambda: compute_step(b.layer.experts, recv_RD, counts_e, g_RD),
        "no_comm": lambda: layer_step(local, b.x_TD, b.g_TD),
    }


def count_bytes(steps: dict[str, Callable[[], None]], per_node: int) -> dict[str, dict[str, int]]:
    """One step of each (also the warm-up: connections, allocator): the row bytes it sends,
    summed over ranks."""
    counted: dict[str, int] = {}
    for name, step in steps.items():
        with CommProbe(per_node) as counter:
            step()
        counted[f"{name}.sent"], counted[f"{name}.inter_node"] = counter.sent, counter.inter_node
    total = _all_sum(counted)
    return {
        v: {"sent": total[f"{v}.sent"], "inter_node": total[f"{v}.inter_node"]}
        for v in steps
        if v not in ("compute_only", "no_comm")
    }


def measure(shape: Shape, chunks: Sequence[int], repeats: int, per_node: int) -> dict[str, Any]:
    """Every variant's time and bytes on this process group (collective: every rank calls it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    b = setup(shape)
    steps = {**layer_steps(b, chunks, per_node), **isolated_steps(b)}
    bytes_per_step = count_bytes(steps, per_node)
    rows = _all_sum(routed_rows_by_place(b.send_Pe.flatten(), rank, world, per_node))
    (received,) = reduce_over_ranks([float(b.recv_Pe.sum())])
    (most,) = reduce_over_ranks([float(b.recv_Pe.sum())], "max")
    times, waited = time_variants(steps, repeats, per_node)
    dtype_bytes = b.x_TD.element_size()
    return {
        "world": world,
        "per_node": per_node,
        "threads": torch.get_num_threads(),
        "shape": asdict(shape),
        "chunks": list(chunks),
        "repeats": repeats,
        "times": times,
        "waited": waited,
        **summarize(times),
        "bytes_per_step": bytes_per_step,
        "routed_rows": rows["routed"],
        "recv_rows_max_over_mean": most * world / received,
        "min_bytes": min_bytes(rows["routed"], shape.dim, dtype_bytes),
        "remote_min_bytes": min_bytes(rows["remote"], shape.dim, dtype_bytes),
        "inter_node_min_bytes": min_bytes(rows["inter_node"], shape.dim, dtype_bytes),
    }


def add_options(parser: argparse.ArgumentParser) -> None:
    """The shape options (``benchmarks.common.add_shape_options``) and ``--chunks``: shared by
    tools/bench_overlap.py and the worker."""
    add_shape_options(parser, Shape(), repeats=7)
    parser.add_argument("--chunks", default="2,4,8", help="overlap degrees to time (> 1)")


def parse_chunks(text: str) -> list[int]:
    """``--chunks`` ("2,4") as a list; raises ``ValueError`` unless every degree is > 1."""
    chunks = [int(c) for c in text.split(",") if c.strip()]
    if not chunks or any(c < 2 for c in chunks):
        raise ValueError(f"--chunks takes overlap degrees > 1, e.g. 2,4; got {text!r}")
    return chunks


def worker_args(args: argparse.Namespace) -> list[str]:
    """The driver's shape options, forwarded to every worker."""
    return [*shape_args(shape_from(args, Shape), args.repeats), "--chunks", args.chunks]


# --- driver: one simulated cluster per link rate ----------------------------------------------


def run_cluster(rate: str, args: Sequence[str], index: int, timeout: float) -> dict[str, Any]:
    """One simulated-cluster run (2 nodes x 2 processes, each node's link shaped to ``rate``,
    "none" = unlimited) of the worker; returns rank 0's result."""
    return run_on_sim_cluster(
        "benchmarks.overlap_worker",
        ["--label", rate, *args],
        prefix=f"mtbo{os.getpid() % 10000}{index}",
        rate="" if rate == "none" else rate,
        timeout=timeout,
    )


def run(rates: Sequence[str], args: Sequence[str], timeout: float = 600) -> dict[str, Any]:
    """Every rate's result; ``overlap_efficiency`` (and its variant) is the first rate's."""
    runs = {rate: run_cluster(rate, args, i, timeout) for i, rate in enumerate(rates)}
    first = runs[rates[0]]
    return {
        "overlap_efficiency": first["overlap_efficiency"],
        "best_variant": first["best_variant"],
        "rate": rates[0],
        "shape": first["shape"],
        "runs": runs,
    }
