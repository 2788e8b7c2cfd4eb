"""Benchmark ``python -m moetrain.data.prepare``: MB/s and tokens/s beside the tokenizer alone.

    python tools/bench_prepare.py [--size-mb 50] [--workers 4] [--vocab 8192] [--seed 0]
        [--repeats 3] [--json]

Writes a synthetic .jsonl corpus in a temporary directory, trains a small BPE on it (no
download) and times prepare with --workers 1, 2 and each --workers given, for the byte tokenizer
and the BPE, beside the tokenizer alone (the ceiling); exits 1 if an output differs from
--workers 1's (benchmarks/prepare.py).

Not a test: figures are only comparable within one run (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: beside tools/

from benchmarks.prepare import format_table, run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=50.0, help="corpus size (MB of jsonl)")
    parser.add_argument("--workers", type=int, nargs="*", default=[], help="more workers counts")
    parser.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (best kept)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.size_mb <= 0 or args.repeats < 1 or any(n < 1 for n in args.workers):
        parser.error("--size-mb must be > 0, --repeats and --workers counts >= 1")
    result = run(args.size_mb, args.workers, args.vocab, args.seed, args.repeats)
    print(json.dumps(result) if args.json else format_table(result))
    same = all(ok for per_tok in result["identical"].values() for ok in per_tok.values())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
