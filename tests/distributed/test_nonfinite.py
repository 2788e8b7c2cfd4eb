"""A non-finite loss or gradient norm (``train.nonfinite``): ``stop`` ends the run on every rank
at that step with one line naming the step, the quantity and the first rank that saw it, and
writes nothing after it; ``skip`` leaves weights, optimizer, schedule and balancing state as
they were and counts the skip. In one process and at ep2 (the NaN injected on one rank only),
with a checkpoint after every step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from moetrain.testing import run_distributed
from moetrain.testing.layouts import write_token_dir

BIAS = ["model.moe.bias_update_rate=0.001"]  # aux-loss-free balancing state must not move either


def inject_nan(trainer, step: int, rank: int) -> None:
    """Make rank ``rank``'s loss NaN in optimizer step ``step``."""
    original = trainer._lm_loss

    def lm_loss(inputs, targets):
        loss = original(inputs, targets)
        if trainer.step + 1 == step and trainer.ctx.rank == rank:
            return loss * float("nan")
        return loss

    trainer._lm_loss = lm_loss


def state_of(trainer) -> dict[str, torch.Tensor]:
    from moetrain.parallel.parallelize import full_state

    state = {f"w.{k}": v for k, v in full_state(trainer.pm).items()}
    for i, layer in enumerate(trainer.moe_layers):
        state[f"bias.{i}"] = layer.router.expert_bias_E.clone()
    return state


def run_with_nan(
    rank: int, world: int, data_dir: str, run_dir: str, policy: str, nan_rank: int
) -> dict:
    from moetrain.config.validate import parallel_dims
    from moetrain.parallel.context import init_parallel
    from moetrain.testing.layouts import layout_config
    from moetrain.train.nonfinite import NonFiniteError
    from moetrain.train.trainer import Trainer

    del rank
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    overrides = [*BIAS, f"train.nonfinite={policy}", "optim=adamw", "checkpoint.interval=1"]
    if world > 1:
        overrides.append("parallel.ep=2")
    cfg = layout_config(data_dir, overrides)
    out: dict[str, Any] = {"error": None, "rows": []}
    trainer = Trainer(cfg, Path(run_dir), init_parallel(parallel_dims(cfg)))
    inject_nan(trainer, step=2, rank=nan_rank)
    try:
        for _ in range(3):
            before = state_of(trainer)
            lr_steps = trainer.scheduler.last_epoch
            stats, _, _ = trainer.train_step()
            trainer.save_checkpoint()
            after = state_of(trainer)
            changed = [k for k in before if not torch.equal(before[k], after[k])]
            moved = trainer.scheduler.last_epoch != lr_steps
            out["rows"].append({**stats, "changed": len(changed), "lr_moved": moved})
    except NonFiniteError as err:
        out["error"] = str(err)
    out["checkpoints"] = sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("0*"))
    latest = Path(run_dir) / "checkpoints" / "latest"
    out["latest"] = latest.read_text().strip() if latest.exists() else None
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world, nan_rank", [(1, 0), (2, 1)])
def test_stop_names_the_step_quantity_and_rank_and_saves_nothing_after(tmp_path, world, nan_rank):
    data_dir = write_token_dir(str(tmp_path / "tokens"))
    run_dir = str(tmp_path / "run")
    results = run_distributed(run_with_nan, world, data_dir, run_dir, "stop", nan_rank, timeout=200)
    for res in results:  # every rank stops at the same step, with the same line
        assert res["error"] is not None and "\n" not in res["error"]
        assert res["error"].startswith(
            f"step 2: non-finite loss (nan) first seen on rank {nan_rank}"
        )
        assert len(res["rows"]) == 1  # step 1 only
        assert res["checkpoints"] == ["00000001"] and res["latest"] == "00000001"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world, nan_rank", [(1, 0), (2, 1)])
def test_skip_leaves_every_state_untouched_and_counts(tmp_path, world, nan_rank):
    data_dir = write_token_dir(str(tmp_path / "tokens"))
    run_dir = str(tmp_path / "run")
    results = run_distributed(run_with_nan, world, data_dir, run_dir, "skip", nan_rank, timeout=200)
    for res in results:
        assert res["error"] is None
        first, skipped, third = res["rows"]
        assert first["changed"] > 0 and first["lr_moved"] and first["skipped_steps"] == 0
        assert skipped["changed"] == 0 and not skipped["lr_moved"]  # weights, bias, schedule
        assert skipped["skipped_steps"] == 1
        assert third["changed"] > 0 and third["skipped_steps"] == 1
        assert res["checkpoints"] == ["00000001", "00000002", "00000003"]


def test_bad_policy_is_a_config_error(monkeypatch):
    from moetrain.config.schema import Config
    from moetrain.config.validate import ConfigError, validate

    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = Config()
    cfg.train.nonfinite = "ignore"
    with pytest.raises(ConfigError, match=r"train\.nonfinite: must be stop or skip"):
        validate(cfg)
