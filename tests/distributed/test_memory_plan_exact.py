"""The memory planner's state bytes are exactly what the trainer allocates.

``tools/plan_parallel.py --json`` (fake process group, meta device) against a real 4-process
gloo launch of the same configuration after one AdamW step: every rank's local bytes of
parameters, gradients (read just before ``optimizer.step``) and optimizer state, by dtype, must
equal its rank class's numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from moetrain.testing import run_distributed

ROOT = Path(__file__).resolve().parents[2]
# layout_config's settings that shape the model and its state (the data settings do not)
BASE = [
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.seq_len=32",
    "model.moe.z_loss_coeff=0.001",
    "optim=adamw",
]
LAYOUTS = [
    ["parallel.ep=2"],
    ["parallel.pp=2", "parallel.tp=2"],
    ["parallel.cp=2", "parallel.ep=2"],  # dense weights FSDP-sharded over dp_shard x cp
]


def _bytes(tensors: Sequence[torch.Tensor]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        key = str(local.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + local.numel() * local.element_size()
    return out


def measure_rank(rank: int, world: int, data_dir: str, overrides: list[str]) -> dict[str, Any]:
    """One AdamW step; this rank's local parameter, gradient and optimizer-state bytes."""
    import tempfile

    from moetrain.config.validate import parallel_dims
    from moetrain.parallel.context import init_parallel
    from moetrain.testing.layouts import layout_config
    from moetrain.train.trainer import Trainer

    cfg = layout_config(data_dir, [*overrides, "optim=adamw"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), init_parallel(parallel_dims(cfg)))
        params = trainer.pm.parameters()
        grads: dict[str, int] = {}

        def record(*_: Any) -> None:  # the step zeroes the gradients right after: read them here
            grads.update(_bytes([p.grad for p in params if p.grad is not None]))

        trainer.optimizer.register_step_pre_hook(record)
        trainer.train_step()
        state = [t for s in trainer.optimizer.state.values() for t in s.values()]
        assert all(isinstance(t, torch.Tensor) for t in state)
        return {
            "parameters": _bytes(params),
            "gradients": grads,
            "optimizer_state": _bytes(state),
        }


def planner(overrides: list[str]) -> dict[str, Any]:
    tool = str(ROOT / "tools" / "plan_parallel.py")
    proc = subprocess.run(
        [sys.executable, tool, "--world-size", "4", "--json", *BASE, *overrides],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides", LAYOUTS, ids=lambda o: "_".join(o))
def test_planner_state_bytes_equal_the_trainers(tmp_path, overrides):
    from moetrain.testing.layouts import write_token_dir

    plan = planner(overrides)
    assert plan["world_size"] == 4 and plan["all_parameters_on_meta"]
    data_dir = write_token_dir(str(tmp_path / "tokens"))
    measured = run_distributed(measure_rank, 4, data_dir, overrides, timeout=240)
    classes = {r: c for c in plan["per_rank"] for r in c["ranks"]}
    assert sorted(classes) == [0, 1, 2, 3]
    for rank, got in enumerate(measured):
        expected = classes[rank]["bytes"]
        for kind in ("parameters", "gradients", "optimizer_state"):
            assert got[kind] == expected[kind], (rank, kind, got[kind], expected[kind])
