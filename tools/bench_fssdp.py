"""Benchmark FSSDP against static expert parallelism under routing skew (one MoE layer).

    python tools/bench_fssdp.py [--skews uniform,zipf1.0,zipf1.5,hot] [--repeats 5]
        [--experts 8 --top-k 2 --dim 256 --hidden 1024 --tokens 8192] [--no-pin]
        [--layouts ep,fssdp[,fssdp_keep]]
        [--cluster [--cluster-tokens N] [--rate 1gbit]] [--json]

The main figure: 2 processes on loopback, one core each. With --cluster (root) also 4 processes
on the simulated 2-node cluster (launch/sim_cluster.sh). --json prints one JSON object whose
``figures`` keys name the figure and the skew (``speedup_zipf1.5``, ``memory_ratio_zipf1.5``,
``straggler_ep_zipf1.5``, ``cluster_speedup_hot``, ...). ``fssdp_keep`` adds FSSDP without
rematerialization (its keys: ``speedup_fssdp_keep_zipf1.5``, ...).

Not a test: figures are only comparable within one run (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: beside tools/

from benchmarks.common import shape_from
from benchmarks.fssdp import LAYOUTS, Shape, add_options, format_table, run
from benchmarks.skew import SKEWS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser)
    parser.add_argument("--no-pin", action="store_true", help="do not pin each process to a core")
    parser.add_argument("--cluster", action="store_true", help="also 4 processes on 2 sim. nodes")
    parser.add_argument("--cluster-tokens", type=int, default=None, help="T per rank there")
    parser.add_argument("--rate", default="", help="cluster link rate (tc tbf), e.g. 1gbit")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    skews = args.skews.split(",")
    unknown = set(skews) - set(SKEWS)
    if unknown:
        parser.error(f"--skews: unknown {sorted(unknown)}; choose from {list(SKEWS)}")
    layouts = args.layouts.split(",")
    if layouts[0] != "ep" or set(layouts) - set(LAYOUTS):
        parser.error(f"--layouts: ep first, then some of {list(LAYOUTS[1:])}")
    shape = shape_from(args, Shape)
    cluster_shape = shape
    if args.cluster_tokens:
        cluster_shape = dataclasses.replace(shape, tokens=args.cluster_tokens)
    result = run(
        shape,
        skews,
        args.repeats,
        args.cluster,
        cluster_shape,
        args.rate,
        not args.no_pin,
        layouts,
    )
    if args.json:
        print(json.dumps({**result["figures"], "runs": result}))
        return
    print(format_table(result["loopback"], "loopback"))
    if "cluster" in result:
        print()
        print(format_table(result["cluster"], "simulated 2 nodes x 2"))
    elif "cluster_skipped" in result:
        print(result["cluster_skipped"])


if __name__ == "__main__":
    main()
