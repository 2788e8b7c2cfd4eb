"""Train the tiny MoE and the tiny dense model (same active parameters) on the same tokens and
report both validation losses.

    python tools/compare_dense.py [--steps 400] [extra Hydra overrides ...]

Not a test: one run of each, same seed, same data order, same steps and tokens. The runs write
to runs/compare_dense-<timestamp>/tiny and .../tiny_dense under the current directory.
"""

from __future__ import annotations

import argparse
import json
import time

from moetrain.train.cli import compose_config, setup
from moetrain.train.metrics import bits_per_token


def train(model: str, steps: int, out_dir: str, extra: list[str]) -> dict:
    overrides = [
        f"model={model}",
        f"train.steps={steps}",
        f"run.dir={out_dir}/{model}",
        "logging.wandb.mode=disabled",
        *extra,
    ]
    _, _, trainer = setup(compose_config(overrides))
    result = trainer.run()
    step, val = result.val_losses[-1]
    return {
        "model": model,
        "params_total": trainer.num_params,
        "params_active": trainer.num_active_params,
        "steps": step,
        "val_loss": val,
        "val_bits_per_byte": bits_per_token(val),
        "first_val_loss": result.val_losses[0][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400, help="training steps of each run")
    parser.add_argument("--json", action="store_true", help="print one JSON list of both rows")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to both runs")
    args = parser.parse_args()
    out_dir = f"runs/compare_dense-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = [train(m, args.steps, out_dir, args.overrides) for m in ("tiny", "tiny_dense")]
    if args.json:
        print(json.dumps(rows))
        return
    for r in rows:
        print(
            f"{r['model']:11} total {r['params_total'] / 1e6:.2f}M active "
            f"{r['params_active'] / 1e6:.2f}M | val loss {r['val_loss']:.4f} "
            f"({r['val_bits_per_byte']:.3f} bits/byte) after {r['steps']} steps"
        )
    moe, dense = rows
    print(f"MoE - dense validation loss: {moe['val_loss'] - dense['val_loss']:+.4f}")


if __name__ == "__main__":
    main()
