"""Side-by-side benchmark of the MoE layer: fraction of the machine's peak GEMM rate.

For each shape and peer: the median forward+backward time, the routed rows the peer computed,
and ``fraction = (expert FLOPs / peak FLOP/s) / time`` (docs/benchmarks.md). The peak is measured
in this process before and after the peers (the spread tells how noisy the machine was).
"""

from __future__ import annotations

import traceback
from dataclasses import asdict, dataclass

import torch

from benchmarks.common import peer_lines
from benchmarks.ops import format_ops_table, time_ops
from benchmarks.peers import PEERS, PeerUnavailable, Shape
from moetrain.ops import active_backend
from moetrain.perf import expert_flops, fraction_of_peak, measure_peak_flops, median_time

CASES = {
    "coarse": dict(num_experts=8, top_k=2, dim=512, hidden_dim=1024, num_tokens=4096),
    "fine": dict(num_experts=64, top_k=8, dim=512, hidden_dim=128, num_tokens=4096),
}
MODES = {"dropless": None, "cf1.25": 1.25}


@dataclass
class Row:
    case: str
    mode: str
    peer: str
    seconds: float | None = None
    routed_rows: int | None = None
    fraction_of_peak: float | None = None
    note: str = ""


def shapes(cases: list[str], modes: list[str]) -> list[Shape]:
    """Every case x mode as a ``Shape`` (case names of ``CASES``, modes of ``MODES``)."""
    return [Shape(name=c, capacity_factor=MODES[m], **CASES[c]) for c in cases for m in modes]


def measure(shape: Shape, peer: str, peak: float, repeats: int) -> Row:
    """``peer``'s median step and fraction of ``peak`` at ``shape``; an unavailable or failing
    peer gives a row with a note instead of raising."""
    row = Row(shape.name, shape.mode, peer)
    try:
        built = PEERS[peer](shape)
        row.seconds = median_time(built.step, repeats=repeats)
        row.routed_rows = built.routed_rows()
    except PeerUnavailable as why:
        row.note = f"skipped: {why}"
        return row
    except Exception as err:  # a peer that breaks must not hide the others' figures
        row.note = f"failed: {type(err).__name__}: {err}".splitlines()[0][:200]
        traceback.print_exc()
        return row
    flops = expert_flops(row.routed_rows, shape.dim, shape.hidden_dim)
    row.fraction_of_peak = fraction_of_peak(flops, row.seconds, peak)
    return row


def run(
    cases: list[str],
    modes: list[str],
    peers: list[str],
    repeats: int,
    threads: int,
    ops: bool = True,
) -> dict:
    """The layer rows for every shape x peer and, with ``ops``, the dispatch/combine ops' csrc
    vs reference timings at the same shapes (``benchmarks.ops``)."""
    torch.set_num_threads(threads)
    peak_start = measure_peak_flops()
    rows = [measure(s, p, peak_start, repeats) for s in shapes(cases, modes) for p in peers]
    op_rows = time_ops(shapes(cases, modes), repeats) if ops else []
    peak_end = measure_peak_flops()
    return {
        "threads": threads,
        "torch": torch.__version__,
        "ops_backend": active_backend(),
        "peak_flops": peak_start,
        "peak_flops_end": peak_end,
        "rows": [asdict(r) for r in rows],
        "ops": op_rows,
    }


def format_table(result: dict) -> str:
    """``run``'s result as a table (and the ops table when it has op rows)."""
    lines = [
        f"peak GEMM (fp32, {result['threads']} threads): {result['peak_flops'] / 1e9:.1f} GFLOP/s "
        f"at start, {result['peak_flops_end'] / 1e9:.1f} at end (spread = machine noise)",
        f"ops backend: {result['ops_backend']}",
        f"{'case':8} {'mode':9} {'peer':22} {'median':>9} {'rows':>7} {'frac':>6} {'vs ours':>8}",
    ]
    lines += peer_lines(
        result["rows"],
        22,
        lambda r: f"{r['seconds'] * 1e3:7.0f}ms {r['routed_rows']:7d} {r['fraction_of_peak']:6.3f}",
    )
    lines.append("frac = expert FLOPs / peak / time; 'vs ours' = peer speed relative to moetrain")
    lines.append("moetrain_reference_ops = MoELayer with the pure-torch dispatch/combine ops")
    if result["ops"]:
        lines += ["", format_ops_table(result["ops"])]
    return "\n".join(lines)
