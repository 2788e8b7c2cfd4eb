"""Benchmark context-parallel attention: forward + backward over one long sequence with SDPA in
one process, the blockwise online-softmax algorithm in one process, and split over cp gloo
processes (the exchanges' share of its time beside it).

    python tools/bench_cp.py [--seq-len 4096] [--heads 8 --kv-heads 2 --head-dim 64]
        [--cp 2[,4]] [--repeats 3] [--json]

Not a test: figures are only comparable within one run (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: beside tools/

from benchmarks.context_parallel import AttentionShape, format_table, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens of the sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences")
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dim")
    parser.add_argument("--cp", default="2", help="comma-separated cp degrees")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    cps = [int(c) for c in args.cp.split(",")]
    bad = [c for c in cps if c < 2 or args.seq_len % (2 * c)]
    if bad:
        parser.error(f"--cp {bad}: each must be >= 2 and divide --seq-len / 2")
    shape = AttentionShape(args.batch, args.heads, args.kv_heads, args.seq_len, args.head_dim)
    rows = run(shape, cps, args.repeats)
    if args.json:
        print(json.dumps({"shape": vars(args), "figures": rows}))
    else:
        print(format_table(shape, rows, os.cpu_count() or 1))


if __name__ == "__main__":
    main()
