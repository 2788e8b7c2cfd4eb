"""Where this rank is: the training phase and the collective it waits in, readable by a
watchdog thread, plus the wall time this rank spent waiting in MoE exchanges.

One record per process (not per thread: on CUDA the autograd engine runs the backward, and
with it the backward's exchanges, on a thread of its own). Writers are the training code:

    set_phase("forward micro-batch 0")        # what the rank does (the trainer's phases)
    with collective("all_to_all", "ep dispatch", label):   # while it waits in an exchange
        work.wait()

Readers (``current()``, from any thread) get an immutable ``Snapshot``. Every update is one
reference assignment (atomic in CPython), so a reader never sees a half-written record and no
lock is taken on the hot path except the one guarding the wait-time accumulator. Cost per
``collective``: one small object and two ``perf_counter`` calls; no host-device sync.

Wait time: the wall time spent inside ``collective`` blocks (the waits of the EP and FSSDP
all-to-alls, the count exchanges, FSSDP's sparse gathers and reduces) accumulates until
``take_comm_wait_s()`` drains it (once per step). On CPU (gloo) a wait blocks until the peers
arrive, so it measures how long this rank waited for the others. On CUDA (NCCL) ``wait`` only
orders streams and returns at once; the waiting shows up in the count exchanges, whose result
is copied to the host (that copy synchronizes with the device, so it also counts GPU work
queued before it): a coarse host-side signal, not device timing.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class Snapshot:
    """The record at one instant: ``phase`` since ``phase_since`` (``perf_counter`` seconds),
    and the collective being waited in, ``(op, what, group label)`` (None outside one), since
    ``collective_since``."""

    phase: str
    phase_since: float
    collective: tuple[str, str, str] | None = None
    collective_since: float = 0.0

    def describe(self) -> str:
        """One short clause without durations (equal on ranks doing the same thing, so a
        summary can group them): ``waiting in all_to_all (ep dispatch) on ep group ranks
        [0, 1], during forward micro-batch 0`` or ``in forward micro-batch 0 (not in a
        collective)``."""
        if self.collective is None:
            return f"in {self.phase} (not in a collective)"
        op, what, group = self.collective
        return f"waiting in {op} ({what}) on {group}, during {self.phase}"

    def durations(self, now: float | None = None) -> str:
        """How long the phase and the collective have lasted at ``now`` (default: now)."""
        now = time.perf_counter() if now is None else now
        text = f"phase for {now - self.phase_since:.1f} s"
        if self.collective is not None:
            text += f", collective for {now - self.collective_since:.1f} s"
        return text


class _Record:
    """The process's record. ``snapshot`` is replaced, never mutated."""

    def __init__(self) -> None:
        self.snapshot = Snapshot("start-up", time.perf_counter())
        self.lock = threading.Lock()
        self.wait_s = 0.0


_RECORD = _Record()
_GROUP_LABELS: dict[Any, str] = {}


def set_phase(name: str) -> None:
    """This rank now does ``name`` (e.g. ``forward micro-batch 0``, ``optimizer``, ``eval``)."""
    _RECORD.snapshot = Snapshot(name, time.perf_counter())


def current() -> Snapshot:
    """The record now (any thread)."""
    return _RECORD.snapshot


def take_comm_wait_s() -> float:
    """Seconds spent in ``collective`` blocks since the last call (drains the accumulator)."""
    with _RECORD.lock:
        wait, _RECORD.wait_s = _RECORD.wait_s, 0.0
    return wait


def reset(phase: str = "start-up") -> None:
    """Start over: phase ``phase``, no collective, no accumulated wait (tests, new runs)."""
    set_phase(phase)
    take_comm_wait_s()


def _compact(ranks: list[int]) -> str:
    """``[0, 1]`` for a few ranks, ``[0..62 step 2] (32 ranks)`` for a long regular list."""
    if len(ranks) <= 8:
        return str(ranks)
    step = ranks[1] - ranks[0]
    if all(b - a == step for a, b in itertools.pairwise(ranks)):
        body = f"{ranks[0]}..{ranks[-1]}" + ("" if step == 1 else f" step {step}")
        return f"[{body}] ({len(ranks)} ranks)"
    return f"[{', '.join(map(str, ranks[:4]))}, ...] ({len(ranks)} ranks)"


def group_label(group: Any, name: str) -> str:
    """``<name> group ranks [...]`` for a process group (None: the default group), computed
    once per group and cached (groups live as long as the process). Outside a process group
    (tests of the pieces): ``<name> group``."""
    key = (group, name)
    label = _GROUP_LABELS.get(key)
    if label is None:
        if dist.is_available() and dist.is_initialized():
            g = group if group is not None else dist.group.WORLD
            label = f"{name} group ranks {_compact(dist.get_process_group_ranks(g))}"
        else:
            label = f"{name} group"
        _GROUP_LABELS[key] = label
    return label


class collective:  # lower case: used like a function, ``with collective(...):``
    """Context manager: this rank waits in collective ``op`` (``all_to_all``, ``all_gather``)
    for ``what`` (``ep dispatch``) over ``group`` (a ``group_label``). Records it for readers
    and adds the block's wall time to the wait accumulator. A nested block leaves the outer
    record alone and its time is counted once, by the outer block."""

    __slots__ = ("names", "outermost", "start")

    def __init__(self, op: str, what: str, group: str) -> None:
        self.names = (op, what, group)
        self.start = 0.0
        self.outermost = False

    def __enter__(self) -> None:
        snap = _RECORD.snapshot
        self.start = time.perf_counter()
        self.outermost = snap.collective is None
        if self.outermost:
            _RECORD.snapshot = Snapshot(snap.phase, snap.phase_since, self.names, self.start)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.outermost:
            return
        elapsed = time.perf_counter() - self.start
        snap = _RECORD.snapshot  # re-read: a phase set meanwhile is kept
        _RECORD.snapshot = Snapshot(snap.phase, snap.phase_since)
        with _RECORD.lock:
            _RECORD.wait_s += elapsed
