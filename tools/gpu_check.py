"""One-shot check of a GPU machine: csrc built with CUDA, the kernels' self-check, every
gpu-marked test, and training steps of a Mixtral-shaped layer stack in bf16 with
experts_impl=grouped_mm and loop; prints one JSON object and exits 1 if any part failed.

    python tools/gpu_check.py [--cpu] [--steps N] [--out FILE] [--skip-build] [--skip-tests]

--cpu runs every part that runs without CUDA (the CPU build and self-check, the gpu tests
collected and skipped, a tiny layer stack). Progress goes to stderr; docs/benchmarks.md,
"GPU check", explains the fields.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: beside tools/

from benchmarks.gpu_check import Options, run_check


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--cpu", action="store_true", help="the parts that run without CUDA")
    parser.add_argument(
        "--steps", type=int, help="training steps per experts_impl (default 20; 3 with --cpu)"
    )
    parser.add_argument(
        "--out", type=Path, metavar="FILE", help="also write the JSON object to this file"
    )
    parser.add_argument("--skip-build", action="store_true", help="use csrc as it is built")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the gpu tests")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 3:
        parser.error(f"--steps must be at least 3 (warm-up, timed, split), got {args.steps}")
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device here: run it on a GPU machine, or pass --cpu")
    opts = Options(args.cpu, args.steps, args.skip_build, args.skip_tests)
    report = run_check(opts)
    text = json.dumps(report, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
