"""PrefetchingBatches: same batches as the plain BatchIterator at any depth, consumed-position
state_dict and exact resume, worker errors in the caller, thread shutdown, and overlap (checked
with events, not timings: docs/benchmarks.md)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from moetrain.data.batches import BatchIterator
from moetrain.data.dataset import WindowDataset
from moetrain.data.prefetch import THREAD_NAME, PrefetchingBatches
from moetrain.data.sampler import ShuffledSampler

pytestmark = pytest.mark.timeout(60)

SEQ, MICRO, G = 4, 2, 8
NUM_WINDOWS = 22  # an epoch every 2.75 steps of G=8: steps cross epoch boundaries mid-batch
TOKENS = np.random.default_rng(0).integers(0, 1000, NUM_WINDOWS * SEQ + 1).astype(np.uint16)


def plain(dp_rank: int = 0, dp_size: int = 1, micro: int = MICRO) -> BatchIterator:
    ds = WindowDataset(TOKENS, SEQ)
    return BatchIterator(ds, ShuffledSampler(len(ds), 5), micro, dp_rank=dp_rank, dp_size=dp_size)


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def draw(it, n: int) -> list[list]:
    return [it.next_global_batch(G) for _ in range(n)]


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


class Recording:
    """A source that wraps ``BatchIterator`` and sets ``done[i]`` when batch i is assembled;
    optionally sleeps ``delay_s`` per batch or raises on call ``fail_at`` (the first time)."""

    def __init__(self, delay_s: float = 0.0, fail_at: int | None = None) -> None:
        self.inner = plain()
        self.delay_s, self.fail_at = delay_s, fail_at
        self.calls = 0
        self.done = [threading.Event() for _ in range(64)]

    def next_global_batch(self, global_batch_size: int) -> list:
        i, self.calls = self.calls, self.calls + 1
        if i == self.fail_at:
            self.fail_at = None
            self.inner.sampler.take(3)  # half-done work the rewind must undo
            raise KeyError("token file vanished at batch 3")
        time.sleep(self.delay_s)
        out = self.inner.next_global_batch(global_batch_size)
        self.done[i].set()
        return out

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_batches_and_state_as_plain_iterator(depth):
    ref = plain()
    with PrefetchingBatches(plain(), G, depth) as pf:
        assert pf.state_dict() == ref.state_dict() == {"epoch": 0, "index": 0}
        for _ in range(20):  # ~7 epochs
            assert_same(pf.next_global_batch(G), ref.next_global_batch(G))
            # the worker ran ahead, yet the state is the consumed position
            assert pf.state_dict() == ref.state_dict()
            assert isinstance(pf.last_wait_s, float) and pf.last_wait_s >= 0
    assert pf.source.state_dict() == ref.state_dict()  # close() rewound the source
    assert not prefetch_threads()


def test_data_parallel_ranks():
    for rank in range(2):
        ref = plain(rank, 2, micro=2)
        with PrefetchingBatches(plain(rank, 2, micro=2), G, 2) as pf:
            for _ in range(7):
                batch = pf.next_global_batch(G)
                assert len(batch) == G // (2 * 2)
                assert_same(batch, ref.next_global_batch(G))


@pytest.mark.parametrize("depth", [0, 2])
def test_resume_from_state_continues_exactly(depth):
    uninterrupted = PrefetchingBatches(plain(), G, depth)
    draw(uninterrupted, 5)
    state = uninterrupted.state_dict()
    expected = draw(uninterrupted, 9)
    uninterrupted.close()

    source = plain()
    source.load_state_dict(dict(state))  # as a trainer resuming a checkpoint would
    with PrefetchingBatches(source, G, depth) as resumed:
        assert resumed.state_dict() == state
        for want in expected:
            assert_same(resumed.next_global_batch(G), want)


def test_load_state_dict_mid_run_rewinds():
    ref = plain()
    with PrefetchingBatches(plain(), G, 3) as pf:
        draw(pf, 4)
        state = pf.state_dict()
        after = draw(pf, 6)
        pf.load_state_dict(state)  # the worker had queued batches past ``state``: dropped
        assert not prefetch_threads()  # restarts lazily
        assert pf.state_dict() == state
        for want in after:
            assert_same(pf.next_global_batch(G), want)
        pf.load_state_dict(ref.state_dict())  # back to the start
        for _ in range(4):
            assert_same(pf.next_global_batch(G), ref.next_global_batch(G))


@pytest.mark.parametrize("depth", [0, 2])
def test_worker_error_surfaces_in_caller_and_retry_is_exact(depth):
    ref = plain()
    with PrefetchingBatches(Recording(fail_at=3), G, depth) as pf:
        for _ in range(3):
            assert_same(pf.next_global_batch(G), ref.next_global_batch(G))
        with pytest.raises(KeyError, match="token file vanished at batch 3"):
            pf.next_global_batch(G)
        assert pf.state_dict() == ref.state_dict()  # the failed call consumed nothing
        assert not prefetch_threads()
        for _ in range(4):  # the next call retries the same batch
            assert_same(pf.next_global_batch(G), ref.next_global_batch(G))


def test_worker_assembles_next_batch_while_caller_consumes():
    depth = 2
    src = Recording(delay_s=0.2)
    with PrefetchingBatches(src, G, depth) as pf:
        pf.next_global_batch(G)  # starts the worker; batch 0
        for k in range(1, 4):
            # the "step" on batch k-1 lasts until the worker has assembled batch k on its own
            assert src.done[k].wait(timeout=30)
            pf.next_global_batch(G)
            assert pf.last_wait_s < src.delay_s  # taken from the queue, not assembled
        assert src.done[3 + depth].wait(timeout=30)
        time.sleep(0.3)  # bounded: nothing beyond ``depth`` batches ahead is assembled
        assert src.calls == 4 + depth

    inline = Recording(delay_s=0.2)
    with PrefetchingBatches(inline, G, 0) as pf:
        pf.next_global_batch(G)
        assert pf.last_wait_s >= inline.delay_s  # depth 0: the assembly is the wait
        assert not inline.done[1].is_set() and not prefetch_threads()


def test_close_joins_thread_and_is_idempotent():
    pf = PrefetchingBatches(plain(), G, 2)
    assert not prefetch_threads()  # lazy
    pf.next_global_batch(G)
    threads = prefetch_threads()
    assert len(threads) == 1 and threads[0].daemon
    pf.close()
    pf.close()
    assert not prefetch_threads()
    assert pf.state_dict() == pf.source.state_dict() == {"epoch": 0, "index": G}
    ref = plain()
    ref.next_global_batch(G)
    assert_same(pf.next_global_batch(G), ref.next_global_batch(G))  # not final: continues
    assert len(prefetch_threads()) == 1
    pf.close()
    assert not prefetch_threads()


def test_rejects_other_batch_size_and_bad_depth():
    with PrefetchingBatches(plain(), G, 1) as pf, pytest.raises(ValueError, match="asked for 16"):
        pf.next_global_batch(2 * G)
    with pytest.raises(ValueError, match=r"data\.prefetch"):
        PrefetchingBatches(plain(), G, -1)
    with pytest.raises(ValueError, match="global_batch_size"):
        PrefetchingBatches(plain(), 0, 1)


def test_bench_machinery_runs_tiny():
    from benchmarks.data_loader import Scenario, format_table, run

    scenarios = [Scenario("steady", delay_s=0.002, step_s=0.004, every=1)]
    result = run(scenarios, depths=[0, 1], steps=6, warmup=2)
    assert {(r["scenario"], r["depth"]) for r in result["rows"]} == {("steady", 0), ("steady", 1)}
    assert "hidden" in format_table(result)
    assert not prefetch_threads()
