"""FSSDP vs static expert parallelism (EP) under routing skew: one MoE layer's forward + backward
on N gloo processes, both layouts side by side in one run.

Legend: N ranks, E experts, K top-k, D model dim, F expert hidden dim, T tokens per rank.

Routing is forced (``benchmarks.skew``: uniform, Zipf s=1.0 and 1.5, one hot expert; expert
0 hottest, so static EP's first rank holds the hot experts). Both layouts see the same routing
sequence (same seeds) and the same weights. Figures per (skew, layout):

- ``seconds``: median over repeats of the slowest rank's step (every rank waits at a barrier,
  then times its step; the step time is the maximum over ranks); layouts and skews are timed
  round-robin, one round after the other;
- ``straggler``: max / mean expert rows computed per rank (EP: the rows of the rank's experts;
  FSSDP: the placement's);
- ``bytes``: bytes sent between ranks in one step, all ranks and collectives together (FSSDP:
  also ``weight_bytes``, the SparseAllGather, re-gather and SparseReduceScatter part);
- ``peak_mem``: per rank, the peak resident memory during one step above the resident memory
  before the layer was built (parameters, gradients, materialized experts, activations and
  buffers); the kernel's high-water mark is reset through ``/proc/self/clear_refs`` and, for
  this phase only, large allocations are mmapped (glibc ``mallopt``) so freed memory leaves the
  resident set;
- ``fraction``: expert FLOPs of all ranks / the sum of the ranks' peak GEMM rates / the step
  time (docs/benchmarks.md).

Ratios: ``speedup``, the median over rounds of EP's step time over FSSDP's in the same round (a
round takes seconds, so both saw the same load from whatever else runs on the machine);
``memory_ratio = FSSDP / EP`` peak memory of the rank that peaks highest.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import (
    LayerShape,
    add_shape_options,
    cluster_problem,
    describe_shape,
    gather_ranks,
    reduce_over_ranks,
    run_on_sim_cluster,
    shape_args,
    slowest_rank,
    time_round_robin,
)
from benchmarks.peers import keep_local_experts
from benchmarks.skew import SKEWS, SkewedRouter
from moetrain.moe import MoELayer
from moetrain.parallel.ep import AllToAllDispatcher
from moetrain.parallel.fssdp import FSSDPDispatcher, FSSDPOptions, apply_fssdp
from moetrain.parallel.fssdp_plan import static_ep_rows
from moetrain.perf import expert_flops, measure_peak_flops
from moetrain.torch_compat import all_gather_single

# fssdp_keep: FSSDP without rematerialization (the gathered experts kept from forward to backward)
LAYOUTS = ("ep", "fssdp", "fssdp_keep")
DEFAULT_LAYOUTS = ("ep", "fssdp")


@dataclass(frozen=True)
class Shape(LayerShape):
    """The benchmark's layer: ``LayerShape``'s defaults (E=8 K=2 D=256 F=1024 T=8192/rank)."""


# --- one rank's measurements ------------------------------------------------------------------


def build_layer(shape: Shape, layout: str, skew: str, rank: int, world: int) -> MoELayer:
    """The same layer (weights from seed 0) as EP (E / N whole experts here) or FSSDP (1/N of
    every expert), routing forced to ``skew`` (seeded per rank, the same for both layouts)."""
    torch.manual_seed(0)
    layer = MoELayer(shape.moe_config(aux_loss_coeff=0.0))
    if layout == "ep":
        keep_local_experts(layer, rank, shape.num_experts // world)
        layer.dispatcher = AllToAllDispatcher(shape.num_experts, None)
    else:
        from torch.distributed.device_mesh import DeviceMesh

        options = FSSDPOptions(rematerialize=layout != "fssdp_keep")
        apply_fssdp(layer, DeviceMesh("cpu", list(range(world))), options)
    layer.router = SkewedRouter(layer.router, skew, shape.top_k, seed=1000 + rank)
    return layer


def make_step(layer: MoELayer, shape: Shape, rank: int) -> Callable[[], None]:
    """One forward+backward of ``layer`` on this rank's fixed tokens (seeded by ``rank``)."""
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(shape.tokens, shape.dim, generator=gen).requires_grad_(True)
    g = torch.randn(shape.tokens, shape.dim, generator=gen)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        (layer(x) * g).sum().backward()

    return step


def rows_per_rank(layer: MoELayer, layout: str) -> list[int]:
    """Expert rows each rank computed in the layer's last call (collective)."""
    if layout != "ep":
        assert isinstance(layer.dispatcher, FSSDPDispatcher) and layer.dispatcher.last_plan
        return layer.dispatcher.last_plan.rows_Q.tolist()
    assert layer.last_stats is not None
    counts = layer.last_stats.tokens_per_expert_E.long()
    every = counts.new_empty(dist.get_world_size() * counts.numel())
    all_gather_single(every, counts)
    return static_ep_rows(every.view(dist.get_world_size(), -1)).tolist()


@contextlib.contextmanager
def counted_bytes() -> Iterator[list[int]]:
    """Counts the bytes this rank sends to other ranks in ``all_to_all_single`` and the
    all-gathers while active (``total[0]``)."""
    total = [0]
    # torch 2.11 has only all_gather_into_tensor; moetrain.torch_compat calls whichever exists
    gather_name = (
        "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    )
    a2a, gather = dist.all_to_all_single, getattr(dist, gather_name)

    def counted_a2a(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        me, n = dist.get_rank(kw.get("group")), dist.get_world_size(kw.get("group"))
        row = input[:1].numel() * input.element_size() if input.dim() > 1 else input.element_size()
        if input_split_sizes is None:
            total[0] += input.numel() * input.element_size() * (n - 1) // n
        else:
            total[0] += (sum(input_split_sizes) - input_split_sizes[me]) * row
        return a2a(output, input, output_split_sizes, input_split_sizes, **kw)

    def counted_gather(output, input, group=None, **kw):
        n = dist.get_world_size(group)
        total[0] += input.numel() * input.element_size() * (n - 1)
        return gather(output, input, group=group, **kw)

    dist.all_to_all_single = counted_a2a  # type: ignore[assignment]
    setattr(dist, gather_name, counted_gather)
    try:
        yield total
    finally:
        dist.all_to_all_single = a2a
        setattr(dist, gather_name, gather)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_rss_bytes(fn: Callable[[], None]) -> int:
    """The peak resident set (bytes) while ``fn`` runs: the high-water mark reset first."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    fn()
    return _status_kib("VmHWM") * 1024


def mmap_large_allocations(threshold: int = 64 * 1024) -> None:
    """Allocations of ``threshold`` bytes and more get their own mmap, returned on free (glibc),
    so the resident set follows the live tensors."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, threshold)  # M_TRIM_THRESHOLD


def release_free_memory() -> None:
    """Return freed heap memory to the kernel (glibc ``malloc_trim``), so the next resident-set
    reading counts live memory only."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(
    shape: Shape, skews: Sequence[str], repeats: int, layouts: Sequence[str] = DEFAULT_LAYOUTS
) -> dict[str, Any]:
    """Every (skew, layout)'s figures (module docstring); collective, every rank returns them.
    ``layouts`` must start with ``ep`` (the baseline of the ratios)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if shape.num_experts % world or shape.hidden_dim % world:
        raise ValueError(f"{world} ranks must divide the experts and their hidden dim")
    (peak,) = reduce_over_ranks([measure_peak_flops(repeats=3)])
    if layouts[0] != "ep" or set(layouts) - set(LAYOUTS):
        raise ValueError(f"layouts: ep first, then some of {LAYOUTS[1:]}; got {list(layouts)}")
    cases = [(skew, layout) for skew in skews for layout in layouts]
    layers = {c: build_layer(shape, c[1], c[0], rank, world) for c in cases}
    steps = {c: make_step(layers[c], shape, rank) for c in cases}
    rounds = slowest_rank(time_round_robin(steps, repeats, warmup=True))
    rows: list[dict[str, Any]] = []
    for c in cases:
        layer = layers[c]
        with counted_bytes() as sent:
            steps[c]()
        per_rank = rows_per_rank(layer, c[1])
        mean = sum(per_rank) / len(per_rank)
        weight_bytes = 0.0
        if isinstance(layer.dispatcher, FSSDPDispatcher) and layer.dispatcher.last_bytes:
            b = layer.dispatcher.last_bytes
            (weight_bytes,) = reduce_over_ranks([b.gather + b.regather + b.reduce])
        flops = expert_flops(sum(per_rank), shape.dim, shape.hidden_dim)
        rows.append(
            {
                "skew": c[0],
                "layout": c[1],
                "seconds": statistics.median(rounds[c]),
                # EP's time over this layout's, per round (same load), median: robust to noise
                "speedup": statistics.median(
                    e / t for e, t in zip(rounds[(c[0], "ep")], rounds[c])
                ),
                "rows_per_rank": per_rank,
                "straggler": max(per_rank) / mean if mean else 1.0,
                "bytes": int(reduce_over_ranks(sent)[0]),
                "weight_bytes": int(weight_bytes),
                "fraction": flops / peak / statistics.median(rounds[c]),
            }
        )
    del layers, steps
    _measure_memory(shape, cases, rows, rank, world)
    return {"world": world, "shape": asdict(shape), "peak_flops": peak, "rows": rows}


def _measure_memory(shape: Shape, cases: list, rows: list[dict], rank: int, world: int) -> None:
    """Each case's per-rank peak memory in a step, layers built one at a time (module
    docstring)."""
    mmap_large_allocations()
    for c, row in zip(cases, rows):
        release_free_memory()
        dist.barrier()
        base = _status_kib("VmRSS") * 1024
        layer = build_layer(shape, c[1], c[0], rank, world)
        step = make_step(layer, shape, rank)
        step()  # warm-up: lazily created state
        peak = peak_rss_bytes(step) - base
        row["peak_mem"] = [int(v) for v in gather_ranks(float(peak))]
        del layer, step


def figures(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The flat figures, keyed by what and which skew (``speedup_zipf1.5``, ...)."""
    by = {(r["skew"], r["layout"]): r for r in result["rows"]}
    out: dict[str, float] = {}
    for r in result["rows"]:
        skew, layout = r["skew"], r["layout"]
        ep = by[(skew, "ep")]
        if layout != "ep":
            tag = "" if layout == "fssdp" else f"{layout}_"  # speedup_zipf1.5 = the default FSSDP
            out[f"{prefix}speedup_{tag}{skew}"] = r["speedup"]
            if "peak_mem" in ep:
                out[f"{prefix}memory_ratio_{tag}{skew}"] = max(r["peak_mem"]) / max(ep["peak_mem"])
        out[f"{prefix}seconds_{layout}_{skew}"] = r["seconds"]
        out[f"{prefix}straggler_{layout}_{skew}"] = r["straggler"]
        out[f"{prefix}bytes_{layout}_{skew}"] = r["bytes"]
        out[f"{prefix}fraction_{layout}_{skew}"] = r["fraction"]
        if "peak_mem" in r:
            out[f"{prefix}peak_mem_{layout}_{skew}"] = max(r["peak_mem"])
    return out


def format_table(result: dict[str, Any], title: str) -> str:
    """``measure``'s result as a table headed by ``title``."""
    s = result["shape"]
    lines = [
        f"{title}: {result['world']} ranks, {describe_shape(s)}; peak GEMM (sum over ranks) "
        f"{result['peak_flops'] / 1e9:.0f} GFLOP/s",
        f"{'skew':9} {'layout':10} {'step':>8} {'speedup':>8} {'straggler':>9} {'MB moved':>9} "
        f"{'(weights)':>9} {'peak MB/rank':>13} {'mem x EP':>8} {'frac':>6}",
    ]
    by = {(r["skew"], r["layout"]): r for r in result["rows"]}
    for r in result["rows"]:
        ep = by[(r["skew"], "ep")]
        mem = r.get("peak_mem")
        lines.append(
            f"{r['skew']:9} {r['layout']:10} {r['seconds'] * 1e3:6.0f}ms "
            f"{r['speedup']:7.2f}x {r['straggler']:9.2f} "
            f"{r['bytes'] / 1e6:9.1f} {r['weight_bytes'] / 1e6:9.1f} "
            + (
                f"{max(mem) / 2**20:13.1f} {max(mem) / max(ep['peak_mem']):7.2f}x"
                if mem
                else f"{'-':>13} {'-':>8}"
            )
            + f" {r['fraction']:6.3f}"
        )
    lines.append(
        "step = slowest rank's fwd+bwd (median); speedup = median over rounds of EP step / this "
        "step (taken in the same round); straggler = max/"
        "mean expert rows per rank; MB moved = bytes sent between ranks per step (all ranks); "
        "peak MB/rank = peak RSS in a step above the RSS before the layer (highest rank); "
        "frac = expert FLOPs / sum of ranks' peaks / step"
    )
    return "\n".join(lines)


# --- loopback (run_distributed) and simulated-cluster (torchrun) drivers -----------------------


def loopback_worker(
    rank: int,
    world: int,
    shape: Shape,
    skews: list[str],
    repeats: int,
    pin: bool,
    layouts: Sequence[str] = DEFAULT_LAYOUTS,
) -> dict[str, Any]:
    """``run_distributed`` entry: one thread per process (pinned to core ``rank`` with ``pin``)."""
    torch.set_num_threads(1)
    if pin and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    return measure(shape, skews, repeats, layouts)


def run_loopback(
    shape: Shape,
    skews: list[str],
    repeats: int,
    world: int = 2,
    pin: bool = True,
    layouts: Sequence[str] = DEFAULT_LAYOUTS,
) -> dict[str, Any]:
    """``measure`` on ``world`` gloo processes on loopback (``loopback_worker``); rank 0's
    result."""
    from moetrain.testing import run_distributed

    args = (shape, skews, repeats, pin, tuple(layouts))
    return run_distributed(loopback_worker, world, *args, timeout=3600)[0]


def add_options(parser: argparse.ArgumentParser) -> None:
    """The shape options (``benchmarks.common.add_shape_options``), ``--skews`` and
    ``--layouts``: shared by tools/bench_fssdp.py and the cluster worker."""
    add_shape_options(parser, Shape(), repeats=5)
    parser.add_argument("--skews", default=",".join(SKEWS), help=f"of {list(SKEWS)}")
    parser.add_argument(
        "--layouts", default=",".join(DEFAULT_LAYOUTS), help=f"ep first, then of {LAYOUTS[1:]}"
    )


def worker_args(
    shape: Shape, skews: Sequence[str], repeats: int, layouts: Sequence[str]
) -> list[str]:
    """The command line ``add_options`` parses back into these arguments (for the workers)."""
    return [*shape_args(shape, repeats), "--skews", ",".join(skews), "--layouts", ",".join(layouts)]


def run_cluster(
    shape: Shape,
    skews: Sequence[str],
    repeats: int,
    layouts: Sequence[str] = DEFAULT_LAYOUTS,
    rate: str = "",
    timeout: float = 3600,
) -> dict[str, Any]:
    """2 simulated nodes x 2 processes (``rate`` shapes each node's link with tc tbf, empty =
    unlimited); returns rank 0's result."""
    return run_on_sim_cluster(
        "benchmarks.fssdp_worker",
        worker_args(shape, skews, repeats, layouts),
        prefix=f"mtfs{os.getpid() % 100000}",
        rate=rate,
        subnet="10.78.0",
        timeout=timeout,
    )


def _main_figure_skews(skews: Sequence[str]) -> list[str]:
    return [s for s in skews if s in SKEWS]


def run(
    shape: Shape,
    skews: Sequence[str],
    repeats: int,
    cluster: bool,
    cluster_shape: Shape | None = None,
    rate: str = "",
    pin: bool = True,
    layouts: Sequence[str] = DEFAULT_LAYOUTS,
) -> dict[str, Any]:
    """The loopback figure (2 processes) and, with ``cluster``, the simulated 2-node cluster's
    (4 processes); ``figures`` flattens both (cluster keys prefixed ``cluster_``)."""
    skews = _main_figure_skews(skews)
    loopback = run_loopback(shape, list(skews), repeats, pin=pin, layouts=layouts)
    result: dict[str, Any] = {"loopback": loopback}
    flat = figures(result["loopback"])
    if cluster:
        problem = cluster_problem("bench_fssdp")
        if problem is not None:
            result["cluster_skipped"] = problem
        else:
            result["cluster"] = run_cluster(cluster_shape or shape, skews, repeats, layouts, rate)
            flat.update(figures(result["cluster"], "cluster_"))
    result["figures"] = flat
    return result
