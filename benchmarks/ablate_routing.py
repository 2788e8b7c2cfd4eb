"""Routing ablation machinery (tools/ablate_routing.py): train ``tiny`` once per routing option
on the same tokens, then tabulate validation loss, experts per token, drops and throughput.

Every run uses the same seed, data order, steps, batch and sequence length; only
``model.moe.*`` keys differ. Active compute: the baseline computes 2 FFN experts per token.
Where an option changes that, the option is set so the *expected* FFN count under balanced
routing is 2 (null experts: top-3 over 8 FFN + 4 null, 3 x 8/12 = 2; expert-choice: capacity
factor 1.0 gives every expert 2T/8 tokens, exactly 2 per token on average), or the measured
count is reported beside the loss (top-p and zero-computation experts spend what their router
learns to spend: that is the option).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

OPTIONS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("top-2 of 8, dropless (the tiny default)", []),
    "capacity": (
        "top-2 of 8, capacity factor 1.0 (tokens dropped)",
        ["model.moe.capacity_factor=1.0"],
    ),
    "null_experts": (
        "AdaMoE: top-3 of 8 FFN + 4 null experts",
        ["model.moe.num_null_experts=4", "model.moe.top_k=3"],
    ),
    "zero_compute": (
        "MoE++: top-2 of 8 FFN + zero, copy, 2 constant; gating residual; tau 0.75",
        [
            "model.moe.num_zero_experts=1",
            "model.moe.num_copy_experts=1",
            "model.moe.num_constant_experts=2",
            "model.moe.gating_residual=true",
            "model.moe.zero_compute_aux_weight=0.75",
        ],
    ),
    "top_p": (
        "top-p 0.4, 1..4 experts, entropy loss 1e-4",
        ["model.moe.top_p=0.4", "model.moe.max_k=4", "model.moe.entropy_loss_coeff=1e-4"],
    ),
    "expert_choice": (
        "expert-choice per sequence, capacity factor 1.0 (non-causal)",
        ["model.moe.expert_choice=sequence", "model.moe.capacity_factor=1.0"],
    ),
    # routing research II; {fifth} and {half} are the run's steps // 5 and // 2
    "rectify": (
        "Rectify-Router: capacity factor 1.0, intra-group (groups of 4) and fill-in",
        [
            "model.moe.capacity_factor=1.0",
            "model.moe.expert_groups=4",
            "model.moe.rectify_intra_group=true",
            "model.moe.rectify_fill_in=true",
        ],
    ),
    "dense_to_sparse": (
        "EvoMoE: dense-to-sparse gate for the first fifth (tau 2 -> 0.3, threshold 0.05)",
        ["model.moe.dense_to_sparse_steps={fifth}"],
    ),
    "top_k_schedule": (
        "SMoE-Dropout: frozen random router, k 1 -> 2 over the first half",
        [
            "model.moe.top_k_schedule_steps={half}",
            "model.moe.top_k_start=1",
            "model.moe.freeze_router=true",
        ],
    ),
    "adaptive_aux": (
        "Skywork-MoE: adaptive per-layer aux coefficients (beta 0.9, xi 0.1) from 0.01",
        ["model.moe.adaptive_aux_smoothing=0.9", "model.moe.adaptive_aux_sensitivity=0.1"],
    ),
    "node_limited": (
        "DeepSeek-V3: 2 node groups of 4 experts, each token within 1",
        ["model.moe.num_node_groups=2", "model.moe.max_node_groups=1"],
    ),
    "locality": (
        "LocMoE: node-limited + locality bias 0.1 at ep2 over 2 simulated nodes (2 processes)",
        [
            "model.moe.num_node_groups=2",
            "model.moe.max_node_groups=1",
            "model.moe.locality_bias=0.1",
            "parallel.ep=2",
            "parallel.ep_ranks_per_node=1",
        ],
    ),
}
# options that only mean something across ranks: run under torchrun with this many processes
PROCESSES = {"locality": 2}


@dataclass
class Row:
    option: str
    description: str
    val_loss: float
    experts_per_token: float  # slots with a route, mean over MoE layers and logged steps
    ffn_experts_per_token: float  # FFN experts before dropping
    dropped_frac: float  # FFN assignments dropped by capacity
    unrouted_frac: float  # tokens no FFN expert computed
    tokens_per_s: float
    seconds: float


def _mean_layers(rows: list[dict], key: str) -> float:
    """``key`` (a per-MoE-layer list in every training row) averaged over layers and rows."""
    return statistics.fmean(statistics.fmean(r[key]) for r in rows)


def option_keys(name: str, steps: int) -> list[str]:
    """The overrides of option ``name`` for a run of ``steps`` steps."""
    return [k.format(fifth=max(steps // 5, 1), half=max(steps // 2, 1)) for k in OPTIONS[name][1]]


def _torchrun(processes: int, overrides: list[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={processes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "-m",
        "moetrain.train",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"torchrun of {overrides} failed:\n{proc.stderr[-3000:]}")


def train_one(name: str, overrides: list[str], common: list[str], out_dir: Path) -> Row:
    """One training run of option ``name`` (under torchrun for the options of ``PROCESSES``);
    its row from metrics.jsonl."""
    from moetrain.moe.routes import NonCausalRoutingWarning
    from moetrain.train.cli import compose_config, setup
    from moetrain.train.run_meta import val_history

    description = OPTIONS[name][0]
    steps = int(next(c for c in common if c.startswith("train.steps=")).split("=")[1])
    keys = option_keys(name, steps)
    run_dir = out_dir / name
    all_overrides = [*common, *keys, *overrides, f"run.dir={run_dir}"]
    start = time.perf_counter()
    if name in PROCESSES:  # the same micro-batches, spread over the processes
        _torchrun(PROCESSES[name], all_overrides)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonCausalRoutingWarning)  # the table says so
            _, _, trainer = setup(compose_config(all_overrides))
            trainer.run()
    seconds = time.perf_counter() - start
    val_loss = val_history(run_dir / "metrics.jsonl")[-1][1]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "tokens_per_s" in r and "loss" in r]
    steady = train_rows[1:] or train_rows  # the first interval holds start-up
    return Row(
        option=name,
        description=description,
        val_loss=val_loss,
        experts_per_token=_mean_layers(train_rows, "experts_per_token"),
        ffn_experts_per_token=_mean_layers(train_rows, "ffn_experts_per_token"),
        dropped_frac=statistics.fmean(r["dropped_frac"] for r in train_rows),
        unrouted_frac=statistics.fmean(r["unrouted_frac"] for r in train_rows),
        tokens_per_s=statistics.fmean(r["tokens_per_s"] for r in steady),
        seconds=seconds,
    )


def common_overrides(steps: int, batch: int, seq_len: int, seed: int) -> list[str]:
    return [
        f"train.steps={steps}",
        f"train.global_batch_size={batch}",
        # half the batch at most: a 2-process option runs the same micro-batches
        f"train.micro_batch_size={min(max(batch // 2, 1), 4)}",
        f"train.seq_len={seq_len}",
        f"train.seed={seed}",
        "train.eval_interval=0",  # the final evaluation only
        "train.eval_batches=16",
        "train.log_interval=10",
        "checkpoint.interval=0",
        "checkpoint.final=false",
        "logging.wandb.mode=disabled",
    ]


def run(
    names: list[str],
    steps: int,
    batch: int,
    seq_len: int,
    seed: int,
    out_dir: Path,
    extra: list[str],
    spread: bool = True,
) -> dict[str, Any]:
    """Train every option of ``names``; with ``spread``, the baseline once more with the next
    seed (its row, ``baseline_seed+1``, shows how much validation loss moves by seed alone)."""
    common = common_overrides(steps, batch, seq_len, seed)
    rows = [train_one(n, extra, common, out_dir) for n in names]
    if spread:
        other = common_overrides(steps, batch, seq_len, seed + 1)
        row = train_one("baseline", extra, other, out_dir / "seed+1")
        row.option, row.description = "baseline_seed+1", f"the baseline with seed {seed + 1}"
        rows.append(row)
    return {
        "steps": steps,
        "tokens_per_step": batch * seq_len,
        "seed": seed,
        "overrides": extra,
        "rows": [asdict(r) for r in rows],
    }


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{result['steps']} steps x {result['tokens_per_step']} tokens, seed {result['seed']}"
        + (f", overrides {' '.join(result['overrides'])}" if result["overrides"] else "")
    )
    lines = [
        head,
        "",
        "| option | setting | val loss | experts/token | FFN experts/token | dropped | "
        "tokens with no FFN expert | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['option']} | {r['description']} | {r['val_loss']:.4f} | "
            f"{r['experts_per_token']:.2f} | {r['ffn_experts_per_token']:.2f} | "
            f"{100 * r['dropped_frac']:.1f}% | {100 * r['unrouted_frac']:.1f}% | "
            f"{r['tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines)
