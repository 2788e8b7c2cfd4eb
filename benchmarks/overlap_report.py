"""tools/bench_overlap.py's report: the tables of ``benchmarks.overlap.run``'s result (the
figures are defined in ``benchmarks.overlap`` and docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any

from benchmarks.common import describe_shape

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
    """One rate's table: every variant's time, wait, ratios, efficiency and bytes."""
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
    """The report of ``benchmarks.overlap.run``'s result: the setup, then every rate's table."""
    first = next(iter(result["runs"].values()))
    shape = first["shape"]
    lines = [
        f"simulated cluster: {first['world'] // first['per_node']} nodes x {first['per_node']} "
        f"processes (EP={first['world']}), gloo over veth, {first['threads']} thread per process",
        f"shape: {describe_shape(shape)}, fp32, dropless; routed rows max/mean over ranks "
        f"{first['recv_rows_max_over_mean']:.2f}",
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
