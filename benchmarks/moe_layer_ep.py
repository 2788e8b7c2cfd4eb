"""The MoE layer benchmark with expert parallelism: N gloo processes on loopback, one thread each.

Every rank holds E/N experts and its own ``num_tokens`` tokens (the single-process case's count:
each rank does the single-process run's expert work, see docs/benchmarks.md), and runs each
peer's forward+backward the same number of times, the peers taking turns; a barrier starts
every timed step. Per peer: the slowest rank's median time, the routed rows summed over ranks,
and

    fraction = (expert FLOPs of all ranks / sum of the ranks' peaks) / slowest rank's time

with each rank measuring its own peak (1 thread) at the same time as the others, at the start
and at the end of the run (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import statistics
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from benchmarks.common import peer_lines, time_round_robin
from benchmarks.peers import EP_PEERS, Peer, PeerUnavailable, Shape
from moetrain.ops import active_backend
from moetrain.perf import (
    PEAK_N,
    expert_flops,
    fraction_of_peak,
    measure_peak_flops,
    retain_freed_memory,
)
from moetrain.testing import run_distributed


@dataclass
class RankRow:
    """One peer at one shape, as one rank measured it."""

    case: str
    mode: str
    peer: str
    times: list[float] = field(default_factory=list)
    routed_rows: int | None = None  # rows this rank's tokens sent to experts
    expert_flops: int | None = None  # of those rows
    note: str = ""


def _failed(row: RankRow, err: Exception) -> None:
    # a peer that breaks must not hide the others' figures (it breaks on every rank alike)
    row.note = f"failed: {type(err).__name__}: {err}".splitlines()[0][:200]
    traceback.print_exc()


def _build(shape: Shape, peer: str) -> tuple[RankRow, Peer | None]:
    row = RankRow(shape.name, shape.mode, peer)
    try:
        built = EP_PEERS[peer](shape)
        built.step()  # warmup
        return row, built
    except PeerUnavailable as why:  # raised before any collective, on every rank alike
        row.note = f"skipped: {why}"
    except Exception as err:
        _failed(row, err)
    return row, None


def measure_shape(shape: Shape, peers: list[str], repeats: int) -> list[RankRow]:
    """This rank's rows for every peer at ``shape``; collective: every rank calls it with the
    same arguments. The peers take turns repeat by repeat (a burst of load from elsewhere hits
    them alike), and a barrier lines the ranks up before each timed step."""
    built = [_build(shape, p) for p in peers]
    steps = {i: _guarded(row, peer) for i, (row, peer) in enumerate(built) if peer is not None}
    for i, times in time_round_robin(steps, repeats).items():
        built[i][0].times = times
    for row, peer in built:
        if peer is not None and not row.note:
            row.routed_rows = peer.routed_rows()  # collective for some peers: every rank
            row.expert_flops = expert_flops(row.routed_rows, shape.dim, shape.hidden_dim)
    return [row for row, _ in built]


def _guarded(row: RankRow, peer: Peer) -> Callable[[], None]:
    """``peer.step``, but a failure goes to ``row.note`` (and the peer runs no more) instead of
    raising: one broken peer leaves the others' figures."""

    def step() -> None:
        if row.note:
            return
        try:
            peer.step()
        except Exception as err:
            _failed(row, err)

    return step


def _concurrent_peak(n: int) -> float:
    dist.barrier()  # every rank measures its peak while the others measure theirs
    return measure_peak_flops(n=n)


def ep_worker(
    rank: int,
    world: int,
    shapes: list[Shape],
    peers: list[str],
    repeats: int,
    threads: int,
    peak_n: int = PEAK_N,
    retain_memory: bool = False,
) -> dict:
    """One rank of ``run_ep`` (``run_distributed`` calls it with the default group up)."""
    if retain_memory:
        retain_freed_memory()
    # DeepSpeed logs to stdout: keep this process's stdout off the parent's (--json prints there)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    torch.set_num_threads(threads)
    peak_start = _concurrent_peak(peak_n)
    rows = [row for shape in shapes for row in measure_shape(shape, peers, repeats)]
    peak_end = _concurrent_peak(peak_n)
    return {
        "peak_flops": peak_start,
        "peak_flops_end": peak_end,
        "ops_backend": active_backend(),
        "rows": [asdict(r) for r in rows],
    }


def run_ep(
    ep: int,
    shapes: list[Shape],
    peers: list[str],
    repeats: int,
    threads: int = 1,
    timeout: float = 3600.0,
    peak_n: int = PEAK_N,
    retain_memory: bool = False,
) -> dict:
    """Every shape x peer on ``ep`` gloo processes (``threads`` each); returns the JSON-able
    result (``combine_ranks``). ``peak_n``: size of the peak GEMM (the documented 2048; tests
    take a small one); ``retain_memory``: every rank keeps freed memory
    (``moetrain.perf.retain_freed_memory``). Raises what ``run_distributed`` raises: a rank's
    traceback, or ``TimeoutError`` after ``timeout`` seconds."""
    unknown = set(peers) - set(EP_PEERS)
    if unknown:
        raise ValueError(f"unknown EP peers {sorted(unknown)}; choose from {list(EP_PEERS)}")
    for shape in shapes:
        if shape.num_experts % ep:
            raise ValueError(f"ep={ep} does not divide num_experts={shape.num_experts}")
    per_rank = run_distributed(
        ep_worker, ep, shapes, peers, repeats, threads, peak_n, retain_memory, timeout=timeout
    )
    result = combine_ranks(per_rank)
    result.update(
        threads_per_rank=threads,
        torch=torch.__version__,
        ops_backend=per_rank[0]["ops_backend"],
        retain_freed_memory=retain_memory,
    )
    result["tokens_per_rank"] = {s.name: s.num_tokens for s in shapes}
    return result


def _combine_row(rank_rows: list[dict], peak_sum: float) -> dict:
    first = rank_rows[0]
    out = {k: first[k] for k in ("case", "mode", "peer")}
    notes = [r["note"] for r in rank_rows if r["note"]]
    if notes:
        return {**out, "seconds": None, "routed_rows": None, "fraction_of_peak": None,
                "note": notes[0]}  # fmt: skip
    medians = [statistics.median(r["times"]) for r in rank_rows]
    seconds = max(medians)
    flops = sum(r["expert_flops"] for r in rank_rows)
    return {
        **out,
        "seconds": seconds,
        "slowest_rank": medians.index(seconds),
        "rank_seconds": medians,
        "routed_rows": sum(r["routed_rows"] for r in rank_rows),
        "rank_routed_rows": [r["routed_rows"] for r in rank_rows],
        "fraction_of_peak": fraction_of_peak(flops, seconds, peak_sum),
        "note": "",
    }


def combine_ranks(per_rank: list[dict]) -> dict:
    """The ranks' measurements (``ep_worker``'s returns, in rank order) as one result: per row
    the slowest rank's median time, the routed rows summed over ranks, and the fraction of the
    summed peaks."""
    peak_sum = sum(r["peak_flops"] for r in per_rank)
    rows = [
        _combine_row([r["rows"][i] for r in per_rank], peak_sum)
        for i in range(len(per_rank[0]["rows"]))
    ]
    return {
        "ep": len(per_rank),
        "peak_flops": peak_sum,
        "peak_flops_end": sum(r["peak_flops_end"] for r in per_rank),
        "rank_peak_flops": [r["peak_flops"] for r in per_rank],
        "rows": rows,
    }


def _ep_cells(r: dict) -> str:
    per_rank = "/".join(f"{t * 1e3:.0f}" for t in r["rank_seconds"])
    return (
        f"{r['seconds'] * 1e3:7.0f}ms {per_rank:>16} {r['routed_rows']:7d} "
        f"{r['fraction_of_peak']:6.3f}"
    )


def format_ep_table(result: dict) -> str:
    """``run_ep``'s result as a table."""
    peaks = ", ".join(f"{p / 1e9:.1f}" for p in result["rank_peak_flops"])
    lines = [
        f"EP={result['ep']}: {result['ep']} gloo processes on loopback, "
        f"{result['threads_per_rank']} thread(s) each; ops backend: {result['ops_backend']}",
        f"peak GEMM, summed over ranks: {result['peak_flops'] / 1e9:.1f} GFLOP/s at start "
        f"({peaks} per rank), {result['peak_flops_end'] / 1e9:.1f} at end (spread = noise)",
        f"{'case':8} {'mode':9} {'peer':18} {'slowest':>9} {'per rank':>16} {'rows':>7} "
        f"{'frac':>6} {'vs ours':>8}",
    ]
    lines += peer_lines(result["rows"], 18, _ep_cells)
    lines += [
        f"tokens per rank: {result['tokens_per_rank']} (each rank does the single-process "
        "case's expert work)",
        "slowest = the slowest rank's median fwd+bwd (ms); per rank = each rank's median; "
        "rows = routed rows over all ranks",
        "frac = expert FLOPs of all ranks / sum of the ranks' peaks / slowest time; "
        "'vs ours' = speed relative to moetrain",
    ]
    return "\n".join(lines)
