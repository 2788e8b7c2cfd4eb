"""PrefetchingBatches: global batches assembled ahead of the training step by a background thread.

``PrefetchingBatches(source, G, depth)`` wraps any batch source with ``next_global_batch(G)``,
``state_dict()`` and ``load_state_dict(state)`` (``BatchIterator``, the mixture sampler's
iterator) and returns exactly the batches the source would have returned, in the same order: a
single worker thread calls ``source.next_global_batch(G)`` one batch after another and hands the
results over a FIFO. At most ``depth`` batches are assembled (or being assembled) ahead of the
caller; ``depth=0`` starts no thread and assembles on the caller's thread.

**Exact resume.** The worker runs ahead of the caller, so the source's own position is not the
training position. Each batch travels with a copy of the source state taken right after it was
assembled; ``state_dict()`` returns the one of the last batch the caller received. Whenever the
worker is stopped (``load_state_dict``, ``close``, a worker error) the queued batches are thrown
away and the source is rewound to that position, so a checkpoint's state continues with exactly
the batches an uninterrupted run gets, whatever the depth.

**Why a thread, not a process.** Assembling a batch is reading windows of a memory-mapped token
file and copying them with numpy (``np.stack``, ``astype``): page faults and copy loops run with
the GIL released, so a thread overlaps them with the step. Nothing is tokenized at training time
(``python -m moetrain.data.prepare`` did that), so there is no Python-heavy work for a process to
take off the GIL; a process would instead have to pickle every batch back to the trainer (or set
up shared memory) and hold its own copy of the source, whose state would then live in another
address space.

**Thread safety.** While the worker runs it owns the source: the caller must not call the
source directly, only this object (``state_dict`` never touches the source then). All methods
are meant to be called from one thread (the training loop).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Protocol, Union

import torch

Batch = tuple[torch.Tensor, torch.Tensor]
THREAD_NAME = "moetrain-prefetch"
_POLL_S = 1.0  # how often a waiting caller checks that the worker is still alive


class BatchSource(Protocol):
    """What ``PrefetchingBatches`` wraps: a resumable stream of global batches."""

    def next_global_batch(self, global_batch_size: int) -> list[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class _Ready:
    batch: list[Batch]
    state: dict[str, Any]  # the source's position right after this batch


@dataclass
class _Failed:
    error: BaseException


_Item = Union[_Ready, _Failed]


def _assemble(source: BatchSource, global_batch_size: int, pin_memory: bool) -> list[Batch]:
    batch = source.next_global_batch(global_batch_size)
    if pin_memory:  # page-locked host memory makes the trainer's .to(device) copy asynchronous
        batch = [(x.pin_memory(), y.pin_memory()) for x, y in batch]
    return batch


def _produce(
    source: BatchSource,
    global_batch_size: int,
    pin_memory: bool,
    items: queue.SimpleQueue[_Item],
    slots: threading.Semaphore,
    stopping: threading.Event,
) -> None:
    """The worker: one batch per free slot until told to stop or the source fails.

    Takes no reference to the ``PrefetchingBatches`` so that an unclosed one can still be
    garbage-collected (its finalizer then stops this loop).
    """
    while True:
        slots.acquire()  # a slot is released each time the caller takes a batch
        if stopping.is_set():
            return
        try:
            batch = _assemble(source, global_batch_size, pin_memory)
            state = copy.deepcopy(source.state_dict())
        except BaseException as err:  # handed to the caller, who re-raises it
            items.put(_Failed(err))
            return
        items.put(_Ready(batch, state))


class _Worker:
    """The background thread and what it shares with the caller."""

    def __init__(
        self, source: BatchSource, global_batch_size: int, depth: int, pin_memory: bool
    ) -> None:
        self.items: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self.slots = threading.Semaphore(depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(
            target=_produce,
            args=(source, global_batch_size, pin_memory, self.items, self.slots, self.stopping),
            name=THREAD_NAME,
            daemon=True,  # a crashed training loop never hangs interpreter exit on this thread
        )
        self.thread.start()

    def get(self) -> _Item:
        """The next batch or error, blocking until the worker delivers it."""
        item: _Item | None = None
        while item is None:
            try:
                item = self.items.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.thread.is_alive():  # it may have put its last item before exiting
                    item = self._last_item()
        self.slots.release()
        return item

    def _last_item(self) -> _Item:
        try:
            return self.items.get_nowait()
        except queue.Empty:
            raise RuntimeError("the prefetch worker exited without a batch or an error") from None

    def signal_stop(self) -> None:
        self.stopping.set()
        self.slots.release()  # wakes a worker waiting for a free slot, so it sees ``stopping``


class PrefetchingBatches:
    """``source``'s global batches, assembled up to ``depth`` steps ahead by a worker thread.

    Args:
        source: anything with ``next_global_batch(G)``, ``state_dict()`` and
            ``load_state_dict(state)``; owned by this object from the first call on.
        global_batch_size: G, the only size ``next_global_batch`` accepts.
        depth: at most this many batches assembled ahead of the caller (``data.prefetch``);
            0 assembles inline on the caller's thread.
        pin_memory: pin the batches' host memory (in the worker) when CUDA is available.

    Contract: ``next_global_batch(G)`` returns what ``source.next_global_batch(G)`` would have
    returned, call for call; ``state_dict()`` is the source's position after the last batch
    returned to the caller. A failure of the source is re-raised (same exception object) by
    the ``next_global_batch`` call that would have returned the failed batch; that call
    consumes nothing (the source is rewound), so calling again retries the same batch.
    ``last_wait_s``: seconds the last ``next_global_batch`` call took (waiting for the worker;
    with ``depth=0`` the assembly itself). The worker starts on the first call; ``close()``
    (or leaving a ``with`` block) stops it and is idempotent; a later call starts a new one.
    """

    def __init__(
        self,
        source: BatchSource,
        global_batch_size: int,
        depth: int,
        *,
        pin_memory: bool = False,
    ) -> None:
        if global_batch_size <= 0:
            raise ValueError(f"train.global_batch_size: must be positive, got {global_batch_size}")
        if depth < 0:
            raise ValueError(f"data.prefetch: must be >= 0 (0: no background loading), got {depth}")
        self.source = source
        self.global_batch_size = int(global_batch_size)
        self.depth = int(depth)
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.last_wait_s = 0.0
        self._worker: _Worker | None = None
        self._finalizer: weakref.finalize | None = None
        self._state: dict[str, Any] = {}  # position after the last batch returned (worker on)

    def __enter__(self) -> PrefetchingBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_global_batch(self, global_batch_size: int) -> list[Batch]:
        """The next global batch (this rank's micro-batches), as the source would return it.

        Raises ``ValueError`` if ``global_batch_size`` is not the constructor's, and whatever
        the source raised for this batch.
        """
        if global_batch_size != self.global_batch_size:
            raise ValueError(
                f"PrefetchingBatches assembles global batches of {self.global_batch_size} "
                f"sequences, asked for {global_batch_size}; build a new one for another size"
            )
        start = time.perf_counter()
        try:
            return self._next_inline() if self.depth == 0 else self._next_prefetched()
        finally:
            self.last_wait_s = time.perf_counter() - start

    def _next_inline(self) -> list[Batch]:
        before = copy.deepcopy(self.source.state_dict())
        try:
            return _assemble(self.source, self.global_batch_size, self.pin_memory)
        except BaseException:
            # as with a worker: a failed call consumes nothing, the next one retries the batch
            self.source.load_state_dict(before)
            raise

    def _next_prefetched(self) -> list[Batch]:
        if self._worker is None:
            self._state = copy.deepcopy(self.source.state_dict())
            self._worker = _Worker(self.source, self.global_batch_size, self.depth, self.pin_memory)
            self._finalizer = weakref.finalize(self, self._worker.signal_stop)
        item = self._worker.get()
        if isinstance(item, _Failed):
            self._stop_worker()
            raise item.error
        self._state = item.state
        return item.batch

    def _stop_worker(self) -> None:
        """Stop and join the worker, drop its queued batches and put the source back at the
        position after the last batch returned; no-op without a worker."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        if self._finalizer is not None:
            self._finalizer()  # signal_stop, once
        worker.thread.join()  # waits for a batch being assembled: the source must be idle
        self.source.load_state_dict(copy.deepcopy(self._state))

    def state_dict(self) -> dict[str, Any]:
        """The source's position after the last batch returned to the caller (a copy)."""
        if self._worker is None:  # the source is idle and at that position
            return copy.deepcopy(self.source.state_dict())
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a ``state_dict()`` output): stops the worker, drops the
        batches it assembled, loads ``state`` into the source; the worker restarts on the next
        call."""
        self._stop_worker()  # rewinds first, so a refused ``state`` leaves a consistent position
        self.source.load_state_dict(copy.deepcopy(state))

    def close(self) -> None:
        """Stop and join the worker (after the batch it is assembling, if any) and rewind the
        source to ``state_dict()``; idempotent. Not final: ``state_dict()`` works afterwards and
        ``next_global_batch`` starts a new worker (a trainer may ``run`` again)."""
        self._stop_worker()
