"""Learning-rate schedules, as multipliers of each parameter group's base lr.

``step`` counts optimizer steps taken so far (0 before the first). All schedules warm up
linearly over ``warmup_steps`` (the first step uses lr / warmup_steps), then:

- ``cosine``: half-cosine from 1 down to ``min_lr_ratio`` at the last step;
- ``wsd`` (warmup-stable-decay): 1 until the final ``decay_fraction`` of the steps, then linear
  down to ``min_lr_ratio`` at the last step;
- ``constant``: 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from moetrain.config.schema import OptimConfig


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    last = total_steps - 1
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, math.floor(total_steps * (1 - cfg.decay_fraction)))
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * _progress(step, decay_start, last)
    progress = _progress(step, cfg.warmup_steps, last)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _progress(step: int, start: int, end: int) -> float:
    """0 at ``start``, 1 at ``end`` and after (1 when the phase has no length)."""
    if end <= start:
        return 1.0 if step >= start else 0.0
    return min(max((step - start) / (end - start), 0.0), 1.0)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    fn: Callable[[int], float] = lambda step: lr_multiplier(step, total_steps, cfg)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict[str, int]:
    """The schedule's position: all a checkpoint needs (base lrs come from the config, and the
    number of param groups depends on the parallel layout)."""
    return {"last_epoch": scheduler.last_epoch}


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    step = int(state["last_epoch"])
    scheduler.last_epoch = step
    scheduler._step_count = step + 1  # as if stepped `step` times
    for group, base_lr, fn in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas
    ):
        group["lr"] = base_lr * fn(step)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
