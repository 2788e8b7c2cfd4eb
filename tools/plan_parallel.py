"""Print a parallel layout's plan without launching anything: meshes, the rank table, what each
rank holds and its memory per GPU.

    python tools/plan_parallel.py --world-size 4 parallel.ep=2 [model=... other overrides]
    python tools/plan_parallel.py --world-size 2048 --json model=deepseek_v3 parallel.pp=16 ...
    python tools/plan_parallel.py --presets-table     # docs/parallelism.md's preset layouts

The memory plan runs the trainer's parallelize code on the meta device under torch's fake
process group, once per rank class (docs/parallelism.md, "Memory plan"): seconds and a few
hundred MB even for DeepSeek-V3 at 2,048 ranks. Bad layouts stop with the same one-line message
a launch would give (exit status 2); a plan that needs more than --gpu-memory-gb per GPU is
printed, then one line names the largest rank class and item (exit status 3).

Interleaved pipelines: set parallel.pp_virtual_stages=N like any other key, as a launch would
(--virtual-stages N is its deprecated alias; giving both with different values is an error).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moetrain.config.schema import CheckpointConfig, Config
from moetrain.config.validate import expert_placement, parallel_dims, validate
from moetrain.data.config import DataConfig
from moetrain.models import Transformer
from moetrain.parallel.memory_plan import GB, MemoryPlan, over_budget, plan_memory
from moetrain.parallel.plan import describe_memory, describe_node_traffic, describe_plan
from moetrain.train.cli import compose_config

# the rank table lists every rank up to this world size, one rank per class beyond it
MAX_TABLE_RANKS = 64
# docs/parallelism.md's layouts: (preset, GPUs, overrides, recommended); each preset's first
# row is a layout that does not fit 80 GB, the second the recommendation. Regenerate the doc's
# table with --presets-table after changing one.
COMMON = ["train.dtype=bf16", "optim=adamw"]
AC = "parallel.activation_checkpointing=true"
PRESETS = [
    ("mixtral_8x7b", 16, ["parallel.tp=2", "parallel.ep=8", "train.micro_batch_size=1"], False),
    ("mixtral_8x7b", 16, ["parallel.tp=2", "parallel.ep=8", AC, "train.micro_batch_size=2"], True),
    ("olmoe_1b7b", 8, ["parallel.ep=8", "train.micro_batch_size=4"], False),
    ("olmoe_1b7b", 8, ["parallel.ep=8", "train.micro_batch_size=2"], True),
    ("qwen3_30b_a3b", 16, ["parallel.ep=16", "train.micro_batch_size=1"], False),
    ("qwen3_30b_a3b", 32, ["parallel.ep=16", AC, "train.micro_batch_size=2"], True),
    ("deepseek_v3", 2048, ["parallel.pp=16", "parallel.ep=64", "train.micro_batch_size=1"], False),
    (
        "deepseek_v3",
        2048,
        ["parallel.pp=16", "parallel.ep=64", AC, "train.micro_batch_size=1"],
        True,
    ),
]
PRESET_TRAIN = ["train.seq_len=4096", "train.global_batch_size=4096"]


def fail(message: str, status: int = 2) -> None:
    print(f"plan_parallel: error: {message}", file=sys.stderr)
    sys.exit(status)


def load_config(overrides: list[str], world_size: int) -> Config:
    """The config a launch of ``world_size`` processes would run, checked as training checks
    it (data and checkpoint paths aside: planning reads neither)."""
    cfg = OmegaConf.to_object(compose_config(overrides))
    assert isinstance(cfg, Config)
    os.environ["WORLD_SIZE"] = str(world_size)  # validate() reads the launch's world size
    validate(dataclasses.replace(cfg, data=DataConfig(), checkpoint=CheckpointConfig()))
    return cfg


def layout_text(cfg: Config, world_size: int) -> str:
    """Today's dry run: degrees, meshes, stages and the rank table (one row per rank class
    beyond ``MAX_TABLE_RANKS`` ranks)."""
    m = cfg.model
    dims = parallel_dims(cfg, world_size)
    virtual = cfg.parallel.pp_virtual_stages
    with torch.device("meta"):
        model = Transformer(m)
    ranks = None
    if world_size > MAX_TABLE_RANKS:
        ranks = [p * dims.stage_ranks for p in range(dims.pp)]
    experts = m.moe.num_experts if m.num_moe_layers else None
    text = describe_plan(dims, model, experts, virtual, expert_placement(cfg), ranks)
    if m.num_moe_layers:
        p = cfg.parallel
        per_node = p.ep_ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
        tokens = cfg.train.micro_batch_size * cfg.train.seq_len
        traffic = describe_node_traffic(m.moe, dims, p.ep_a2a, per_node, tokens)
        text += "" if traffic is None else f"\n{traffic}"
    if ranks is not None:
        text += (
            f"\nrank table: the first rank of each pipeline rank only ({world_size} ranks; the "
            f"{dims.stage_ranks} ranks of a stage hold equal shapes)"
        )
    return text


def presets_table(gpu_memory_gb: float) -> str:
    """docs/parallelism.md's table of preset layouts, from the planner (GB per GPU, the rank
    class that needs the most)."""
    rows = [
        "| preset | GPUs | layout | micro-batch x seq | act. ckpt | weights | grads | "
        f"optimizer | activations | other | total (class) | fits {gpu_memory_gb:g} GB | "
        "recommended |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for preset, gpus, overrides, recommended in PRESETS:
        cfg = load_config([f"model={preset}", *COMMON, *PRESET_TRAIN, *overrides], gpus)
        plan = plan_memory(cfg, gpus)
        worst = plan.largest_class
        items = {k: v / GB for k, v in worst.items().items()}
        main = ("parameters", "gradients", "optimizer state", "activations")
        other = sum(v for k, v in items.items() if k not in main)
        layout = " ".join(o.removeprefix("parallel.") for o in overrides[:-1] if o != AC)
        s = plan.settings
        total = worst.total / GB
        rows.append(
            f"| `{preset}` | {gpus} | `{layout}` | {s['micro_batch_size']} x {s['seq_len']} | "
            f"{'on' if s['activation_checkpointing'] else 'off'} | "
            f"{items['parameters']:.1f} | {items['gradients']:.1f} | "
            f"{items['optimizer state']:.1f} | {items['activations']:.1f} | {other:.1f} | "
            f"{total:.1f} ({worst.name}) | {'yes' if total <= gpu_memory_gb else '**no**'} | "
            f"{'**yes**' if recommended else 'no'} |"
        )
    return "\n".join(rows)


VIRTUAL_KEY = "parallel.pp_virtual_stages"


def virtual_stages_overrides(overrides: list[str], flag: int | None) -> list[str]:
    """``overrides`` with the deprecated ``--virtual-stages`` flag folded in as the config key
    it aliases; a ValueError when the key is also given with another value."""
    if flag is None:
        return overrides
    pairs = [o.lstrip("+").split("=", 1) for o in overrides if "=" in o]
    given = [value for key, value in pairs if key == VIRTUAL_KEY]
    if any(value.strip() != str(flag) for value in given):
        raise ValueError(
            f"--virtual-stages {flag} disagrees with {VIRTUAL_KEY}={given[-1]}; give only "
            f"{VIRTUAL_KEY}=N (--virtual-stages is its deprecated alias)"
        )
    print(
        f"plan_parallel: warning: --virtual-stages is deprecated; use {VIRTUAL_KEY}={flag}",
        file=sys.stderr,
    )
    return overrides if given else [*overrides, f"{VIRTUAL_KEY}={flag}"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-size", type=int, help="ranks of the launch (required)")
    parser.add_argument(
        "--virtual-stages",
        type=int,
        help=f"deprecated alias of {VIRTUAL_KEY}=N (interleaved pipeline stages per rank)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--gpu-memory-gb", type=float, default=80.0, help="per-GPU budget (default 80)"
    )
    parser.add_argument(
        "--presets-table", action="store_true", help="print docs/parallelism.md's table"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help=f"Hydra overrides (model=..., parallel.*=..., {VIRTUAL_KEY}=...)",
    )
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_intermixed_args()  # overrides before and after options
    if args.presets_table:
        print(presets_table(args.gpu_memory_gb))
        return
    if args.world_size is None:
        parser.error("--world-size is required (or --presets-table)")
    try:
        overrides = virtual_stages_overrides(list(args.overrides), args.virtual_stages)
        cfg = load_config(overrides, args.world_size)
    except (ValueError, OmegaConfBaseException, HydraException) as err:  # LayoutError included
        fail(str(err))
    plan: MemoryPlan = plan_memory(cfg, args.world_size)
    if args.json:
        print(json.dumps(plan.to_json(args.gpu_memory_gb)))
    else:
        print(layout_text(cfg, args.world_size))
        print(describe_memory(plan, args.gpu_memory_gb))
    problem = over_budget(plan, args.gpu_memory_gb)
    if problem is not None:
        fail(problem, status=3)


if __name__ == "__main__":
    main()
