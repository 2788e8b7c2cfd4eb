"""One torchrun process of tools/bench_overlap.py's simulated cluster:

    python -m benchmarks.overlap_worker --out PATH [--label RATE] [benchmarks.overlap options]

(run by ``benchmarks.overlap.run_cluster`` through launch/sim_cluster.sh, with the repository
root on ``PYTHONPATH``). Every rank measures (``benchmarks.overlap.measure``); rank 0 writes the
JSON result, with ``label`` added, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import shape_from
from benchmarks.overlap import Shape, add_options, measure, parse_chunks


def worker(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line), join torchrun's gloo group (env://), measure
    with one thread, write rank 0's result."""
    parser = argparse.ArgumentParser(description="bench_overlap worker (run by torchrun)")
    parser.add_argument("--out", required=True, help="rank 0 writes its JSON result here")
    parser.add_argument("--label", default="", help="the link (e.g. 1gbit), recorded as is")
    add_options(parser)
    args = parser.parse_args(argv)
    shape = shape_from(args, Shape)
    chunks = parse_chunks(args.chunks)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated")
    torch.set_num_threads(1)  # 4 processes share the cores; gloo's threads need some too
    dist.init_process_group("gloo")  # torchrun's env:// rendezvous
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    try:
        dist.barrier()
        rank0 = dist.get_rank() == 0
        if rank0:
            print(f"bench_overlap[{args.label}]: {shape}, chunks {chunks}", file=sys.stderr)
        result = measure(shape, chunks, args.repeats, per_node)
        if rank0:
            Path(args.out).write_text(json.dumps({**result, "label": args.label}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    worker()
