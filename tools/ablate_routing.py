"""Routing ablation: train the tiny MoE once per routing option on the same tokens and print one
table (validation loss, experts per token, FFN experts per token, dropped fraction, tokens with
no FFN expert, tokens/s).

    python tools/ablate_routing.py [--options baseline,null_experts,...] [--steps 500]
        [--batch 16] [--seq-len 128] [--seed 0] [--no-spread] [--out DIR] [--json]
        [Hydra overrides ...]

Options (benchmarks/ablate_routing.py says how each matches the baseline's active compute):
baseline, capacity, null_experts, zero_compute, top_p, expert_choice (routing research I);
rectify, dense_to_sparse, top_k_schedule, adaptive_aux, node_limited, locality (routing
research II; locality runs at ep2 over 2 simulated nodes under torchrun, as the locality bias
changes nothing in one process). The runs go to DIR/<option> (default
runs/ablate_routing-<timestamp>); the table is also written to DIR/ablation.md (and
DIR/ablation.json). Unless --no-spread, the baseline runs a second time with the next seed: its
row is the seed-to-seed spread the other rows must beat. About an hour on 2 CPU cores with the
defaults (13 runs of 500 steps x 2,048 tokens).

Not a test: one seed, one short run per option; differences below the seed-to-seed spread
(the baseline_seed+1 row) mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: beside tools/

from benchmarks.ablate_routing import OPTIONS, format_table, run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--options", default=",".join(OPTIONS), help="comma-separated")
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="directory of the runs")
    parser.add_argument(
        "--no-spread", action="store_true", help="skip the baseline's second-seed run"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()
    names = [n for n in args.options.split(",") if n]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown or not names:
        parser.error(f"--options: choose from {', '.join(OPTIONS)}; got {args.options!r}")
    if min(args.steps, args.batch, args.seq_len) < 1:
        parser.error("--steps, --batch and --seq-len must be positive")
    out = args.out or Path(f"runs/ablate_routing-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty: pick a new directory")
    out.mkdir(parents=True, exist_ok=True)
    result = run(
        names,
        args.steps,
        args.batch,
        args.seq_len,
        args.seed,
        out,
        args.overrides,
        spread=not args.no_spread,
    )
    table = format_table(result)
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result) if args.json else table)


if __name__ == "__main__":
    main()
