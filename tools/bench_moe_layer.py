"""Benchmark the MoE layer's forward+backward beside its peers, as a fraction of peak GEMM rate.

    python tools/bench_moe_layer.py [--cases coarse,fine] [--modes dropless,cf1.25]
        [--peers moetrain,reference,balanced_bmm,deepspeed,transformers] [--repeats 5]
        [--threads N] [--no-ops] [--json]

Also times the dispatch/combine ops (csrc kernels vs pure-torch references) at the same shapes,
unless --no-ops.

Not a test: figures are only comparable within one run (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json

import torch

from moetrain.bench.moe_layer import CASES, MODES, format_table, run
from moetrain.bench.peers import PEERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {list(CASES)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {list(MODES)}")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"of {list(PEERS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-ops", action="store_true", help="skip csrc-vs-reference op timings")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    for option, valid in (("cases", CASES), ("modes", MODES), ("peers", PEERS)):
        unknown = set(getattr(args, option).split(",")) - set(valid)
        if unknown:
            parser.error(f"--{option}: unknown {sorted(unknown)}; choose from {list(valid)}")
    result = run(
        args.cases.split(","),
        args.modes.split(","),
        args.peers.split(","),
        args.repeats,
        args.threads,
        ops=not args.no_ops,
    )
    print(json.dumps(result) if args.json else format_table(result))


if __name__ == "__main__":
    main()
