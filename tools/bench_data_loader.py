"""Benchmark the prefetching data loader: how much of a slow source's delay it hides.

    python tools/bench_data_loader.py [--depths 0,1,2,4] [--delay-ms 20] [--step-ms 30]
        [--burst-every 8] [--burst-delay-ms 90] [--steps 60] [--warmup 4]
        [--step-kind sleep|matmul] [--json]

Three scenarios (benchmarks/data_loader.py): ``steady`` (every batch delayed by the smaller of
delay/step, the step the larger: fully hideable at depth >= 1), ``source-bound`` (the two
swapped: the source's throughput caps what is hidden), ``burst`` (every k-th batch delayed by
``--burst-delay-ms``: hidden up to ``depth x step``). Prints one table, or one JSON object with
--json. CPU only, about 20 s with the defaults.

Not a test: figures are only comparable within one run (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: beside tools/

from benchmarks.data_loader import STEP_KINDS, default_scenarios, format_table, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="0,1,2,4", help="prefetch depths, comma-separated")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="steady per-batch delay")
    parser.add_argument("--step-ms", type=float, default=30.0, help="simulated step duration")
    parser.add_argument("--burst-every", type=int, default=8, help="burst: every k-th batch slow")
    parser.add_argument("--burst-delay-ms", type=float, default=90.0, help="burst: its delay")
    parser.add_argument("--steps", type=int, default=60, help="steps per (scenario, depth)")
    parser.add_argument("--warmup", type=int, default=4, help="first steps not counted")
    parser.add_argument("--step-kind", choices=STEP_KINDS, default="sleep")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    try:
        depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        parser.error(f"--depths: comma-separated integers, got {args.depths!r}")
    if min(depths) < 0 or args.burst_every < 1 or min(args.delay_ms, args.step_ms) <= 0:
        parser.error("depths must be >= 0, --burst-every >= 1, --delay-ms/--step-ms > 0")
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    scenarios = default_scenarios(
        args.delay_ms / 1e3, args.step_ms / 1e3, args.burst_every, args.burst_delay_ms / 1e3
    )
    result = run(scenarios, depths, args.steps, args.warmup, args.step_kind)
    print(json.dumps(result) if args.json else format_table(result))


if __name__ == "__main__":
    main()
