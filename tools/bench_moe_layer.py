"""Benchmark the MoE layer's forward+backward beside its peers, as a fraction of peak GEMM rate.

    python tools/bench_moe_layer.py [--cases coarse,fine] [--modes dropless,cf1.25]
        [--peers moetrain,reference,balanced_bmm,deepspeed,transformers] [--repeats 5]
        [--threads N] [--no-ops] [--json] [--ep N] [--retain-freed-memory]

Also times the dispatch/combine ops (csrc kernels vs pure-torch references) at the same shapes,
unless --no-ops. With --ep N: N gloo processes on loopback (--threads each, default 1), every
rank with E/N experts and the case's tokens, peers moetrain, moetrain_overlap2, deepspeed and
balanced_bmm (benchmarks.moe_layer_ep). --retain-freed-memory: glibc malloc keeps freed
memory in every benchmark process (moetrain.perf.retain_freed_memory), as a caching allocator would.

Not a test: figures are only comparable within one run (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: beside tools/

from benchmarks.moe_layer import CASES, MODES, format_table, run, shapes
from benchmarks.moe_layer_ep import format_ep_table, run_ep
from benchmarks.peers import EP_PEERS, PEERS
from moetrain.perf import retain_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {list(CASES)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {list(MODES)}")
    parser.add_argument(
        "--peers", help=f"of {list(PEERS)}, or with --ep of {list(EP_PEERS)} (default: all)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--threads", type=int, help="default: all cores; 1 per rank with --ep")
    parser.add_argument("--no-ops", action="store_true", help="skip csrc-vs-reference op timings")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel processes (gloo)")
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="glibc keeps freed memory (no fresh mmap per large tensor), for every peer",
    )
    args = parser.parse_args()
    all_peers = EP_PEERS if args.ep > 1 else PEERS
    args.peers = args.peers or ",".join(all_peers)
    if args.ep < 1:
        parser.error(f"--ep must be >= 1, got {args.ep}")
    for option, valid in (("cases", CASES), ("modes", MODES), ("peers", all_peers)):
        unknown = set(getattr(args, option).split(",")) - set(valid)
        if unknown:
            parser.error(f"--{option}: unknown {sorted(unknown)}; choose from {list(valid)}")
    cases, modes, peers = args.cases.split(","), args.modes.split(","), args.peers.split(",")
    if args.ep > 1:
        for case in cases:
            if CASES[case]["num_experts"] % args.ep:
                parser.error(f"--ep {args.ep} does not divide case {case}'s experts")
        result = run_ep(
            args.ep,
            shapes(cases, modes),
            peers,
            args.repeats,
            args.threads or 1,
            retain_memory=args.retain_freed_memory,
        )
        print(json.dumps(result) if args.json else format_ep_table(result))
        return
    threads = args.threads or torch.get_num_threads()
    if args.retain_freed_memory:
        retain_freed_memory()
    # peers' own output (DeepSpeed logs to stdout) goes to stderr: --json prints one object
    with contextlib.redirect_stdout(sys.stderr):
        result = run(cases, modes, peers, args.repeats, threads, ops=not args.no_ops)
    print(json.dumps(result) if args.json else format_table(result))


if __name__ == "__main__":
    main()
