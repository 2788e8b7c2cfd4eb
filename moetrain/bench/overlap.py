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
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moetrain.bench import sim_cluster
from moetrain.moe import MoEConfig, MoELayer
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
class Shape:
    """The layer (fp32, dropless, SwiGLU); ``tokens`` per rank.

    The default makes the exchanges at 1 Gbit/s take ~3x the expert compute (4 processes on
    2 cores): the forward carries two exchanges per GEMM pass and the backward two per two
    passes, so only when each phase's exchanges outlast its GEMMs can all of the smaller term be
    hidden (docs/benchmarks.md); 4 MB of rows per rank per exchange keeps a step under 0.6 s.
    """

    num_experts: int = 8
    top_k: int = 2
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


# --- worker: one process of the simulated cluster (run by torchrun) ---------------------------


def build_layer(shape: Shape, rank: int, world: int) -> MoELayer:
    """The layer with this rank's e experts (same router on every rank)."""
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=shape.num_experts, top_k=shape.top_k, dim=shape.dim, hidden_dim=shape.hidden_dim
    )
    layer = MoELayer(cfg)
    layer.experts = GroupedExperts(cfg, num_experts=shape.num_experts // world)
    torch.manual_seed(1 + rank)
    layer.experts.reset_parameters()
    return layer


def layer_step(layer: MoELayer, x_TD: Tensor, g_TD: Tensor) -> None:
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
    rows = rows_RD.detach().requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    experts(rows, counts_e).backward(g_RD)


def time_round_robin(
    steps: dict[str, Callable[[], None]], repeats: int, per_node: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median over ``repeats`` of the slowest rank's time of each step (the steps take turns),
    and the mean over ranks of the median time each rank spent blocked in its exchanges."""
    t = torch.zeros(repeats, len(steps), dtype=torch.float64)
    w = torch.zeros_like(t)
    for i in range(repeats):
        for j, step in enumerate(steps.values()):
            dist.barrier()
            with CommProbe(per_node) as probe:
                start = time.perf_counter()
                step()
                t[i, j] = time.perf_counter() - start
            w[i, j] = probe.waited
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    waited = w.median(0).values
    dist.all_reduce(waited)
    times = {name: statistics.median(t[:, j].tolist()) for j, name in enumerate(steps)}
    return times, dict(zip(steps, (waited / dist.get_world_size()).tolist()))


def _all_sum(values: dict[str, int]) -> dict[str, int]:
    t = torch.tensor(list(values.values()), dtype=torch.int64)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


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
    rank, world = dist.get_rank(), dist.get_world_size()
    layer = build_layer(shape, rank, world)
    gen = torch.Generator().manual_seed(100 + rank)
    x_TD = torch.randn(shape.tokens, shape.dim, generator=gen)
    g_TD = torch.randn(shape.tokens, shape.dim, generator=gen)
    with torch.no_grad():
        routed = layer.router(x_TD, None)
    rows = sort_by_expert(Routing(routed.topk_ids_TK, routed.topk_weights_TK), shape.num_experts)
    send_Pe = rows.tokens_per_expert_E.view(world, -1)
    recv_Pe, _ = FlatAllToAll(None).exchange_counts(send_Pe)
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
    received = torch.tensor([float(b.recv_Pe.sum())])
    most = received.clone()
    dist.all_reduce(received)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    times, waited = time_round_robin(steps, repeats, per_node)
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
        "recv_rows_max_over_mean": float(most) * world / float(received),
        "min_bytes": min_bytes(rows["routed"], shape.dim, dtype_bytes),
        "remote_min_bytes": min_bytes(rows["remote"], shape.dim, dtype_bytes),
        "inter_node_min_bytes": min_bytes(rows["inter_node"], shape.dim, dtype_bytes),
    }


def worker(argv: Sequence[str] | None = None) -> None:
    """One torchrun process: ``python -m moetrain.bench.overlap --out PATH [shape options]``;
    rank 0 writes the result (JSON) to ``--out``."""
    parser = argparse.ArgumentParser(description="bench_overlap worker (run by torchrun)")
    parser.add_argument("--out", required=True, help="rank 0 writes its JSON result here")
    parser.add_argument("--label", default="", help="the link (e.g. 1gbit), recorded as is")
    add_shape_options(parser)
    args = parser.parse_args(argv)
    shape = Shape(args.experts, args.top_k, args.dim, args.hidden, args.tokens)
    chunks = parse_chunks(args.chunks)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated")
    torch.set_num_threads(1)  # 4 processes share the cores; gloo's threads need some too
    dist.init_process_group("gloo")  # torchrun's env:// rendezvous
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    try:
        dist.barrier()
        rank0 = dist.get_rank() == 0
        if rank0:
            print(f"bench_overlap[{args.label}]: {shape}, chunks {chunks}", file=sys.stderr)
        result = measure(shape, chunks, args.repeats, per_node)
        if rank0:
            Path(args.out).write_text(json.dumps({**result, "label": args.label}))
    finally:
        dist.destroy_process_group()


def add_shape_options(parser: argparse.ArgumentParser) -> None:
    d = Shape()
    parser.add_argument("--experts", type=int, default=d.num_experts, help="E (global)")
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--dim", type=int, default=d.dim, help="D")
    parser.add_argument("--hidden", type=int, default=d.hidden_dim, help="F (per expert)")
    parser.add_argument("--tokens", type=int, default=d.tokens, help="T per rank")
    parser.add_argument("--chunks", default="2,4,8", help="overlap degrees to time (> 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (median)")


def parse_chunks(text: str) -> list[int]:
    chunks = [int(c) for c in text.split(",") if c.strip()]
    if not chunks or any(c < 2 for c in chunks):
        raise ValueError(f"--chunks takes overlap degrees > 1, e.g. 2,4; got {text!r}")
    return chunks


def worker_args(args: argparse.Namespace) -> list[str]:
    """The driver's shape options, forwarded to every worker."""
    return [
        *("--experts", str(args.experts), "--top-k", str(args.top_k), "--dim", str(args.dim)),
        *("--hidden", str(args.hidden), "--tokens", str(args.tokens)),
        *("--chunks", args.chunks, "--repeats", str(args.repeats)),
    ]


# --- driver: one simulated cluster per link rate ----------------------------------------------


def cluster_problem() -> str | None:
    """Why the simulated cluster cannot run here (None: it can)."""
    return sim_cluster.cluster_problem("bench_overlap")


def run_cluster(rate: str, args: Sequence[str], index: int, timeout: float) -> dict[str, Any]:
    """One simulated-cluster run (2 nodes x 2 processes, each node's link shaped to ``rate``,
    "none" = unlimited) of the worker; returns rank 0's result."""
    return sim_cluster.run_on_sim_cluster(
        "moetrain.bench.overlap",
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


# --- report -----------------------------------------------------------------------------------

VARIANT_NOTES = {
    "flat_c1": "serial: flat all-to-all, no overlap",
    "hier_c1": "2-D all-to-all, no overlap",
    "comm_only": "the 4 row exchanges alone (flat)",
    "compute_only": "the local experts' fwd+bwd alone",
    "no_comm": "the layer with all E experts local, no exchange",
}


def _note(variant: str) -> str:
    if variant in VARIANT_NOTES:
        return VARIANT_NOTES[variant]
    kind, _, n = variant.partition("_c")
    return f"{n} chunks, {'flat' if kind == 'flat' else '2-D'}"


def format_run(rate: str, r: dict[str, Any]) -> list[str]:
    times, eff, waited, sent = r["times"], r["efficiency"], r["waited"], r["bytes_per_step"]
    serial, bound, mb = times["flat_c1"], r["bound_seconds"], 1e6
    lines = [
        f"link {rate}: median of {r['repeats']} repeats of the slowest "
        "rank's fwd+bwd; wait = blocked in exchanges (mean over ranks); MB sent per step",
        f"  {'variant':13} {'ms':>7} {'wait':>6} {'/serial':>7} {'/bound':>6} {'eff':>5} "
        f"{'MB':>6} {'inter':>6}  what",
    ]
    for v, t in times.items():
        b = sent.get(v)
        mbytes = f"{b['sent'] / mb:6.1f} {b['inter_node'] / mb:6.1f}" if b else ""
        e = f"{eff[v]:5.2f}" if v in eff else ""
        lines.append(
            f"  {v:13} {t * 1e3:7.1f} {waited[v] * 1e3:6.1f} {t / serial:7.2f} {t / bound:6.2f} "
            f"{e:>5} {mbytes:>13}  {_note(v)}"
        )
    nodes = r["world"] // r["per_node"]
    gbit = sent["comm_only"]["inter_node"] / nodes * 8 / times["comm_only"] / 1e9
    lines += [
        f"  serial = no_comm + {r['exposed_comm_seconds'] * 1e3:.1f} ms exposed exchanges; "
        f"no_comm = compute_only + {r['rest_seconds'] * 1e3:.1f} ms (router, sort, permutes, "
        f"autograd); comm_only: {gbit:.2f} Gbit/s per node link",
        f"  minimum per step (all ranks): {r['min_bytes'] / mb:.1f} MB = routed rows x D x dtype "
        f"bytes x 4 exchanges; rows for other ranks {r['remote_min_bytes'] / mb:.1f} MB, for "
        f"other nodes {r['inter_node_min_bytes'] / mb:.1f} MB",
        f"  best overlapped: {r['best_variant']}, efficiency {r['overlap_efficiency']:.2f}",
    ]
    return lines


def format_table(result: dict[str, Any]) -> str:
    first = next(iter(result["runs"].values()))
    shape = first["shape"]
    lines = [
        f"simulated cluster: {first['world'] // first['per_node']} nodes x {first['per_node']} "
        f"processes (EP={first['world']}), gloo over veth, {first['threads']} thread per process",
        "shape: T={tokens}/rank D={dim} F={hidden_dim} E={num_experts} K={top_k}, fp32, "
        "dropless".format(**shape)
        + f"; routed rows max/mean over ranks {first['recv_rows_max_over_mean']:.2f}",
        "eff = (T_serial - T) / min(T_comm, T_compute); bound = max(T_comm, T_no_comm) (a "
        "perfect overlap); MB: sent to other ranks, inter: to other nodes",
    ]
    for rate, r in result["runs"].items():
        lines += ["", *format_run(rate, r)]
    lines += [
        "",
        f"overlap_efficiency ({result['rate']}): {result['overlap_efficiency']:.2f} "
        f"({result['best_variant']})",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    worker()
