"""``python -m moetrain.report RUN_DIR``: (re)build ``RUN_DIR/report.html`` and
``RUN_DIR/expert_load.png`` from ``RUN_DIR/metrics.jsonl``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moetrain.report import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moetrain.report",
        description="Build report.html (and expert_load.png) in a moetrain run directory.",
    )
    parser.add_argument("run_dir", type=Path, help="the run directory (holds metrics.jsonl)")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.run_dir)
    except FileNotFoundError as err:
        print(f"moetrain.report: error: {err}", file=sys.stderr)
        return 2
    print(f"moetrain.report: wrote {report.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
