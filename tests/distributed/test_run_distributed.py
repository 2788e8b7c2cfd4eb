"""The shared multi-process helper: results in rank order, failures and hangs reported fast."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from moetrain.testing import run_distributed


def all_reduce_rank(rank: int, world_size: int, scale: int) -> int:
    t = torch.tensor([rank * scale])
    dist.all_reduce(t)
    return int(t) + rank


def fail_on_rank_one(rank: int, world_size: int) -> None:
    assert rank != 1, "rank one refuses"


def hang(rank: int, world_size: int) -> None:
    time.sleep(60)


@pytest.mark.timeout(60)
def test_results_in_rank_order():
    # sum of ranks 0..2 times 10 = 30, plus each rank's own id
    assert run_distributed(all_reduce_rank, 3, 10) == [30, 31, 32]


@pytest.mark.timeout(60)
def test_failure_carries_the_rank_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1.*rank one refuses"):
        run_distributed(fail_on_rank_one, 2)


@pytest.mark.timeout(60)
def test_hang_times_out_quickly():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\]"):
        run_distributed(hang, 2, timeout=5)
    assert time.monotonic() - start < 30
