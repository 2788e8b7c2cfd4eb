"""One torchrun process of tools/bench_fssdp.py's simulated cluster:

    python -m benchmarks.fssdp_worker --out PATH [benchmarks.fssdp.add_options' options]

(run by ``benchmarks.fssdp.run_cluster`` through launch/sim_cluster.sh, with the repository root
on ``PYTHONPATH``). Every rank measures (``benchmarks.fssdp.measure``); rank 0 writes the JSON
result to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import shape_from
from benchmarks.fssdp import Shape, add_options, measure


def worker(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line), join torchrun's gloo group, measure, write
    rank 0's result; the process then ends without interpreter finalization (see below)."""
    parser = argparse.ArgumentParser(description="bench_fssdp worker (run by torchrun)")
    parser.add_argument("--out", required=True)
    add_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # 4 processes share the cores; gloo's threads need some too
    dist.init_process_group("gloo")
    try:
        layouts = args.layouts.split(",")
        result = measure(shape_from(args, Shape), args.skews.split(","), args.repeats, layouts)
        if dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    # The FSSDP layers' DTensors leave references to the default group behind (torch's
    # ``group=group.WORLD`` defaults of torch.distributed.nn.functional, imported after
    # init_process_group, and DeviceMesh), so destroy_process_group cannot join gloo's worker
    # threads. One of them may drop the last collective's work (and with it tensors whose Python
    # objects died) while the interpreter finalizes: its GIL acquire then ends the thread,
    # "terminate called without an active exception" (SIGABRT), and the other node's torchrun
    # waits out its exit barrier. Everything is written: leave without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    worker()
