"""A torchrun worker for ``test_hangs_and_stragglers.py`` (not a test module): rank 1 sleeps
through step 2 and the watchdog must end the launch with its diagnosis.

``api RUN_DIR TIMEOUT_S``: a fake step loop through the Watchdog and activity API directly: each
step sets a phase, exchanges counts and rows through the EP all-to-all and all-reduces a
statistic; at step 2 rank 1 sleeps in its forward, before the exchange, so rank 0 waits in it.

``trainer RUN_DIR TIMEOUT_S DATA_DIR``: ``moetrain.train``'s own path at ``parallel.ep=2``; rank
1 sleeps when the first MoE layer of step 2 starts (a forward pre-hook), so rank 0 waits in
that layer's first all-to-all. Needs the trainer to run the watchdog (``parallel.timeout_s``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moetrain.parallel import activity
from moetrain.parallel.context import init_parallel
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.ep_comm import FlatAllToAll, Splits
from moetrain.train.watchdog import Watchdog

SLEEP_S = 600.0  # far beyond any timeout the test uses: only the watchdog ends it


def api(run_dir: Path, timeout_s: float) -> None:
    ctx = init_parallel(ParallelDims(world_size=2), timeout_s=timeout_s)
    dog = Watchdog(run_dir, ctx.rank, 2, timeout_s, grace_s=5.0)
    dog.start()
    comm = FlatAllToAll(None)
    for step in range(1, 5):
        dog.step_begin(step)
        activity.set_phase("forward micro-batch 0")
        if ctx.rank == 1 and step == 2:
            time.sleep(SLEEP_S)
        recv = comm.exchange_counts(torch.tensor([[1], [1]])).recv_Pe
        comm.start(torch.ones(2, 4), Splits([1, 1], recv.sum(1).tolist()), "ep dispatch").wait()
        activity.set_phase("stats all-reduce")
        dist.all_reduce(torch.ones(1))
        dog.step_end()
    dog.stop()
    print("finished without a hang", flush=True)


def trainer(run_dir: Path, timeout_s: float, data_dir: str) -> None:
    from moetrain.testing.layouts import small_run_command
    from moetrain.train.cli import compose_config, setup

    overrides = [
        *small_run_command(data_dir, run_dir)[3:],  # the overrides, not the command
        "train.steps=4",
        "parallel.ep=2",
        f"parallel.timeout_s={timeout_s:g}",
    ]
    _, _, t = setup(compose_config(overrides))

    def sleep_in_step_2(module, args):
        if t.ctx.rank == 1 and t.step == 1 and module.training:  # trainer.step: steps taken
            time.sleep(SLEEP_S)

    t.moe_layers[0].register_forward_pre_hook(sleep_in_step_2)
    t.run()
    t.close()
    print("finished without a hang", flush=True)


if __name__ == "__main__":
    mode, run_dir, timeout = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    if mode == "api":
        api(run_dir, timeout)
    else:
        trainer(run_dir, timeout, sys.argv[4])
