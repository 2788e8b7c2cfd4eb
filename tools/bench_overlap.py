"""Benchmark the overlapped expert-parallel all-to-all on a simulated 2-node cluster.

    sudo .venv/bin/python tools/bench_overlap.py [--rates 1gbit,none] [--chunks 2,4,8]
        [--repeats 7] [--tokens T] [--dim D] [--hidden F] [--experts E] [--top-k K]
        [--json]

Runs launch/sim_cluster.sh once per rate (2 network namespaces x 2 processes, EP=4, each node's
link shaped with tc to the rate; "none" = unlimited) and reports, per rate, the MoE layer's
forward+backward with the overlap off / on (chunks) / on + 2-D, the exchanges alone, the experts
alone, overlap efficiency = (T_serial - T_overlap) / min(T_comm, T_compute), and the all-to-all
bytes per step against the minimum. --json prints one JSON object (``overlap_efficiency``: the
best overlapped variant at the first rate). Needs root for the namespaces (exits 3 otherwise).

Not a test: figures are only comparable within one run (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: beside tools/

from benchmarks.common import cluster_problem
from benchmarks.overlap import add_options, parse_chunks, run, worker_args
from benchmarks.overlap_report import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1gbit,none", help="tc rates, 'none' = unlimited")
    add_options(parser)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per cluster run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    try:
        parse_chunks(args.chunks)
    except ValueError as err:
        parser.error(str(err))
    why = cluster_problem("bench_overlap")
    if why:
        print(why, file=sys.stderr)
        sys.exit(3)
    result = run(args.rates.split(","), worker_args(args), args.timeout)
    print(json.dumps(result) if args.json else format_table(result))


if __name__ == "__main__":
    main()
