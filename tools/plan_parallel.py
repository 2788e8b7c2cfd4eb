"""Print a parallel layout's plan without launching anything: meshes, the rank table and what
each rank holds.

    python tools/plan_parallel.py --world-size 4 parallel.ep=2 [model=... other overrides]

Bad layouts stop with the same one-line message a launch would give.
"""

from __future__ import annotations

import argparse
import sys

import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moetrain.config.validate import expert_placement, parallel_dims
from moetrain.models import Transformer
from moetrain.parallel.placement import validate_placement_options
from moetrain.parallel.plan import describe_plan
from moetrain.train.cli import compose_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--virtual-stages", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (model=..., parallel.*=...)")
    args = parser.parse_args()
    try:
        cfg = OmegaConf.to_object(compose_config(args.overrides))
        m = cfg.model  # type: ignore[attr-defined]
        dims = parallel_dims(cfg, args.world_size)  # type: ignore[arg-type]
        experts = m.moe.num_experts if m.num_moe_layers else None
        dims.validate_model(m, args.virtual_stages)
        validate_placement_options(cfg.parallel, dims)  # type: ignore[attr-defined]
        placement = expert_placement(cfg)  # type: ignore[arg-type]
    except (ValueError, OmegaConfBaseException, HydraException) as err:  # LayoutError included
        print(f"plan_parallel: error: {err}", file=sys.stderr)
        sys.exit(2)
    with torch.device("meta"):
        model = Transformer(m)
    print(describe_plan(dims, model, experts, args.virtual_stages, placement))


if __name__ == "__main__":
    main()
