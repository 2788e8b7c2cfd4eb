"""A torchrun restart reuses the agent's TCPStore: the keys of the attempt before must not leak
into the next one (a restarted worker would dial a dead worker's address)."""

from __future__ import annotations

import multiprocessing
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moetrain.parallel.context import close_parallel, init_parallel
from moetrain.parallel.dims import ParallelDims


def _attempt(rank: int, port: int, attempt: int, delay: float, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        TORCHELASTIC_USE_AGENT_STORE="True",
        TORCHELASTIC_RESTART_COUNT=str(attempt),
    )
    try:
        time.sleep(delay)
        ctx = init_parallel(ParallelDims(world_size=2), timeout_s=15)
        value = torch.tensor([float(rank + 1)])
        dist.all_reduce(value)
        close_parallel(ctx)
        results.put((rank, value.item()))
    except BaseException as err:  # reported to the parent
        results.put((rank, repr(err)))


def _run_attempt(port: int, attempt: int, late_rank0: bool) -> dict[int, object]:
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    procs = [
        spawn.Process(
            target=_attempt, args=(r, port, attempt, 2.0 if late_rank0 and r == 0 else 0.0, results)
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    return out


@pytest.mark.timeout(120)
def test_restarted_attempt_ignores_the_previous_attempts_addresses():
    # the agent's store: one server for every attempt, as torchrun hosts it
    server = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    assert _run_attempt(server.port, 0, late_rank0=False) == {0: 3.0, 1: 3.0}
    # rank 0 comes up late: rank 1 reads the store first and must not find attempt 0's address
    assert _run_attempt(server.port, 1, late_rank0=True) == {0: 3.0, 1: 3.0}
