"""Named phases of a training step, and a timer that splits the step's time among them.

``with phase("moe/experts"): ...`` marks a region of the forward pass. With no timer active
(always, in training) it is exactly ``torch.profiler.record_function(name)``: a named range in
profiler traces (``train.profile_steps``), nothing else; under ``torch.compile`` too.

While a :class:`PhaseTimer` step is open on this thread, a phase also times itself:

* **forward**: a marker at entry and at exit (a CUDA event on CUDA, so the time is the GPU's
  time between the two points of the stream; ``time.perf_counter`` on the CPU).
* **backward**: the autograd nodes the phase's forward created are identified by their sequence
  numbers (autograd numbers nodes in creation order, per thread: a phase owns the numbers handed
  out between its entry and its exit). :meth:`PhaseTimer.backward` hooks every node of the
  loss's graph; when backward moves from a node of one phase to a node of another (or of none),
  one marker closes the phases left and opens the phases entered. So the backward time of a
  phase is the time from its first node's start to the next node of another phase, summed over
  such runs: gradient accumulation into a phase's own parameters counts to the phase, and the
  intervals of different leaf phases never overlap.

Phases nest ("moe/dispatcher" holds "moe/dispatch", "moe/experts" and "moe/combine"): a parent's
time includes its children's; :class:`PhaseSplit` reports the leaves (phases with no phase inside)
and the rest of the step as ``other`` (embedding, norms, residuals, the loss, the optimizer).

What it cannot see: work outside this thread's forward (activation-checkpoint recomputation runs
inside backward: it counts to the backward of the phase whose node triggered it), regions compiled
by ``torch.compile`` (traced as plain ranges, never timed), and dispatchers that do not run the
three sub-phases in sequence (the overlapped expert-parallel all-to-all interleaves them: only
"moe/dispatcher" is reported). Measure one device per process; the timer adds a Python call per
autograd node and an event per phase boundary, so measure throughput in steps without it.
"""

from __future__ import annotations

import bisect
import functools
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Union

import torch
from torch import Tensor
from torch.profiler import record_function

# a point in time: a recorded CUDA event, or a perf_counter reading (seconds)
Marker = Union[torch.cuda.Event, float]

_ACTIVE: PhaseTimer | None = None  # the timer with an open step, if any


def phase(name: str) -> Any:
    """A context manager naming a region of the forward pass ``name`` (see the module docstring):
    ``record_function(name)`` unless a :class:`PhaseTimer` step is open on this thread outside
    backward, in which case the region is also timed, forward and backward. A plain function
    (no generator) so that ``torch.compile`` traces it as the ``record_function`` it returns."""
    timer = _ACTIVE
    if timer is None or torch.compiler.is_compiling() or not timer.times_forward_here():
        return record_function(name)
    return _TimedPhase(timer, name)


class _TimedPhase:
    """``phase(name)`` while a timer step is open: the profiler range plus the timer's marks."""

    def __init__(self, timer: PhaseTimer, name: str) -> None:
        self.timer, self.name = timer, name
        self.range = record_function(name)
        self.start: Marker = 0.0

    def __enter__(self) -> _TimedPhase:
        self.range.__enter__()
        self.start = self.timer.enter(self.name)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.timer.exit(self.name, self.start)
        self.range.__exit__(exc_type, exc, tb)


@dataclass
class PhaseTime:
    """One phase's mean time per step, milliseconds."""

    forward_ms: float = 0.0
    backward_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.forward_ms + self.backward_ms


@dataclass
class PhaseSplit:
    """The timed steps' mean step time and per-phase times (milliseconds per step);
    ``parents`` maps a nested phase to the phase it ran inside."""

    steps: int
    step_ms: float
    phases: dict[str, PhaseTime] = field(default_factory=dict)
    parents: dict[str, str] = field(default_factory=dict)

    def leaves(self) -> list[str]:
        """The phases no other phase ran inside, in first-seen order."""
        inner_of = set(self.parents.values())
        return [name for name in self.phases if name not in inner_of]

    def other_ms(self) -> float:
        """The step time outside every leaf phase."""
        return self.step_ms - sum(self.phases[name].total_ms for name in self.leaves())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"steps", "step_ms", "phases": {name: {"forward_ms", "backward_ms",
        "total_ms", "fraction", "inside"}}, "other_ms"}``; ``fraction`` of the step time,
        ``inside`` the enclosing phase or None (leaves' fractions and other's sum to 1)."""
        step = self.step_ms or float("nan")
        phases = {
            name: {
                "forward_ms": round(t.forward_ms, 4),
                "backward_ms": round(t.backward_ms, 4),
                "total_ms": round(t.total_ms, 4),
                "fraction": round(t.total_ms / step, 4),
                "inside": self.parents.get(name),
            }
            for name, t in self.phases.items()
        }
        return {
            "steps": self.steps,
            "step_ms": round(self.step_ms, 4),
            "phases": phases,
            "other_ms": round(self.other_ms(), 4),
        }


class PhaseTimer:
    """Times the phases of training steps on ``device`` (one device per process)::

        timer = PhaseTimer(device)
        for batch in batches:
            with timer.step():  # opens the step: phases entered now are timed
                loss = loss_fn(model(batch))
                timer.backward(loss)  # loss.backward(), the graph's nodes timed by phase
                optimizer.step()
                optimizer.zero_grad()
        split = timer.result()  # synchronizes; means per step

    Without :meth:`backward` (a plain ``loss.backward()``) only forward times are recorded.
    One step may be open at a time in the process; :meth:`step` raises ``RuntimeError`` otherwise.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.thread: int | None = None  # the thread whose forward is timed
        self.in_backward = False
        self.steps: list[tuple[Marker, Marker]] = []
        self.forward: dict[str, list[tuple[Marker, Marker]]] = {}
        self.backward_runs: dict[str, list[tuple[Marker, Marker]]] = {}
        self.parents: dict[str, str] = {}
        self._stack: list[str] = []
        # the step's forward: (sequence number, phase path from that number on), ascending
        self._seqs: list[int] = []
        self._paths: list[tuple[str, ...]] = []
        self._bwd_path: tuple[str, ...] = ()
        self._bwd_open: dict[str, Marker] = {}

    def mark(self) -> Marker:
        """Now, on the device's timeline."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: Marker, end: Marker) -> float:
        if isinstance(start, torch.cuda.Event) and isinstance(end, torch.cuda.Event):
            return float(start.elapsed_time(end))
        assert isinstance(start, float) and isinstance(end, float)
        return (end - start) * 1e3

    def times_forward_here(self) -> bool:
        """True where a phase entered now is timed: the step's thread, outside backward."""
        return not self.in_backward and threading.get_ident() == self.thread

    def step(self) -> _Step:
        """A context manager around one training step (see the class docstring)."""
        return _Step(self)

    def _open_step(self) -> Marker:
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("a PhaseTimer step is already open; close it before opening one")
        _ACTIVE = self
        self.thread = threading.get_ident()
        self._stack.clear()
        self._seqs, self._paths = [], []
        return self.mark()

    def _close_step(self, start: Marker) -> None:
        global _ACTIVE
        self.steps.append((start, self.mark()))
        self.thread = None
        _ACTIVE = None

    def enter(self, name: str) -> Marker:
        """Phase ``name`` begins (called by ``phase``); returns its start marker."""
        if self._stack:
            self.parents.setdefault(name, self._stack[-1])
        self._stack.append(name)
        self._boundary()
        return self.mark()

    def exit(self, name: str, start: Marker) -> None:
        """Phase ``name``, entered at ``start``, ends."""
        self.forward.setdefault(name, []).append((start, self.mark()))
        self._stack.pop()
        self._boundary()

    def _boundary(self) -> None:
        seq = torch._C._autograd._get_sequence_nr()  # the number the next node will get
        path = tuple(self._stack)
        if self._seqs and self._seqs[-1] == seq:  # no node since the last boundary
            self._paths[-1] = path
        else:
            self._seqs.append(seq)
            self._paths.append(path)

    def _path_of(self, seq: int) -> tuple[str, ...]:
        i = bisect.bisect_right(self._seqs, seq) - 1
        return self._paths[i] if i >= 0 else ()

    def backward(self, loss: Tensor, retain_graph: bool | None = None) -> None:
        """``loss.backward()`` with each node of its graph attributed to the phase that created
        it (inside an open step)."""
        if _ACTIVE is not self:
            raise RuntimeError("PhaseTimer.backward() must run inside `with timer.step():`")
        handles = []
        for node in _graph_nodes(loss):
            path = self._path_of(node._sequence_nr())
            handles.append(node.register_prehook(functools.partial(self._node_starts, path)))
        self.in_backward = True
        try:
            loss.backward(retain_graph=retain_graph)
        finally:
            self.in_backward = False
            self._switch(())  # the last run ends with backward
            for handle in handles:
                handle.remove()

    def _node_starts(self, path: tuple[str, ...], grad_outputs: Any) -> None:
        if path != self._bwd_path:
            self._switch(path)

    def _switch(self, path: tuple[str, ...]) -> None:
        """Backward moves into ``path``'s phases: one marker ends the runs of the phases left and
        starts those of the phases entered."""
        if path == self._bwd_path:
            return
        now = self.mark()
        for name in self._bwd_path:
            if name not in path:
                start = self._bwd_open.pop(name)
                self.backward_runs.setdefault(name, []).append((start, now))
        for name in path:
            if name not in self._bwd_open:
                self._bwd_open[name] = now
        self._bwd_path = path

    def result(self) -> PhaseSplit:
        """Mean per step over the steps timed so far (waits for the device)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        n = len(self.steps)
        if n == 0:
            return PhaseSplit(0, 0.0)

        def per_step(spans: list[tuple[Marker, Marker]]) -> float:
            return sum(self.elapsed_ms(a, b) for a, b in spans) / n

        split = PhaseSplit(n, per_step(self.steps), parents=dict(self.parents))
        for name in [*self.forward, *self.backward_runs]:
            split.phases.setdefault(
                name,
                PhaseTime(
                    per_step(self.forward.get(name, [])),
                    per_step(self.backward_runs.get(name, [])),
                ),
            )
        return split


class _Step:
    """``PhaseTimer.step()``: opens the timer's step on entry, closes it on exit."""

    def __init__(self, timer: PhaseTimer) -> None:
        self.timer = timer
        self.start: Marker = 0.0

    def __enter__(self) -> PhaseTimer:
        self.start = self.timer._open_step()
        return self.timer

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.timer._close_step(self.start)


def _graph_nodes(loss: Tensor) -> list[torch.autograd.graph.Node]:
    """Every node backward from ``loss`` will run, except the gradient accumulators of leaves
    (their time stays with the phase whose node fed them)."""
    root = loss.grad_fn
    if root is None:
        raise RuntimeError("PhaseTimer.backward(): the loss does not require grad")
    seen: dict[int, torch.autograd.graph.Node] = {id(root): root}
    todo = [root]
    while todo:
        node = todo.pop()
        for child, _ in node.next_functions:
            if child is not None and id(child) not in seen and not hasattr(child, "variable"):
                seen[id(child)] = child
                todo.append(child)
    return list(seen.values())
