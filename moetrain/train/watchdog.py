"""The step watchdog: a hang ends, within ``parallel.timeout_s`` and a grace period, with a
diagnosis instead of a bare backend timeout.

Every rank runs a daemon thread (``Watchdog.start``). The trainer arms it around each step
(``step_begin(step)`` ... ``step_end()``; arming it again restarts the clock, so eval and the
checkpoint save can be watched as their own intervals). When an armed interval has lasted more
than ``timeout_s``, or when another rank has raised the alarm, the rank

1. writes ``<run_dir>/hang-rank<N>.txt``: the step, how long it has run, what the rank was
   doing (``moetrain.parallel.activity``: the phase, and the collective and group it waits in)
   and the Python stack of every thread (``faulthandler``);
2. raises the alarm for the others, if nobody has yet: ``<run_dir>/hang-alarm.json`` (the step
   and the rank whose step timed out), which every watchdog polls (one ``stat`` per poll), so
   a rank outside a watched interval reports too;
3. rank 0 waits up to ``grace_s`` for every rank's report, prints ONE line to stderr naming the
   ranks and what each was doing, ranks that sent nothing included, and writes it to
   ``<run_dir>/hang-summary.txt``; the other ranks wait (up to 3 x ``grace_s``) for that file so
   that none exits, and gets the launch torn down, before rank 0 has spoken;
4. exits with ``os._exit(HANG_EXIT_CODE)`` (75, ``EX_TEMPFAIL``: "try again"): the process
   cannot unwind from a blocked collective, and a non-zero exit lets torchrun's restart policy
   (``--max-restarts``) resume from the last checkpoint.

Files of an earlier attempt in the same run dir are told apart by time: a report, alarm or
summary counts only if written after this process's watchdog started. (Ranks on different
hosts compare wall clocks; a skew of more than the time from start to the hang would confuse
them.) The process group's own collective timeout is ``timeout_s`` + 60 s
(``init_parallel``), so the watchdog fires first. A thread can only report while it gets the
GIL: a rank stuck in C code that holds it shows as "sent no report".
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from moetrain.parallel import activity

HANG_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, retrying may succeed
ALARM_FILE = "hang-alarm.json"
SUMMARY_FILE = "hang-summary.txt"
_SUMMARY_KEY = "summary: "  # the line of a report that rank 0 parses


def report_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"hang-rank{rank}.txt"


def _write_atomically(path: Path, write: Callable[[TextIO], object]) -> None:
    """Write through a temporary file and rename it, so a reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_fresh(path: Path, since: float) -> str | None:
    """The text of ``path`` if it exists and was written at or after ``since`` (wall time)."""
    try:
        if path.stat().st_mtime < since:
            return None
        return path.read_text()
    except OSError:  # absent, or replaced while being read
        return None


def parse_report(text: str) -> dict[str, Any] | None:
    """The ``summary:`` record of a report (rank, step, activity, written), or None."""
    for line in text.splitlines():
        if line.startswith(_SUMMARY_KEY):
            try:
                return dict(json.loads(line[len(_SUMMARY_KEY) :]))
            except ValueError:
                return None
    return None


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def summary_line(
    step: int,
    timeout_s: float,
    world_size: int,
    reports: dict[int, dict[str, Any]],
    run_dir: Path,
) -> str:
    """Rank 0's one line: ranks grouped by what they were doing, those outside a collective
    (the likely cause) first, then those waiting in one, then those that sent no report. A rank
    that reported another step than ``step`` says so."""
    groups: dict[str, list[int]] = {}
    for rank in sorted(reports):
        report = reports[rank]
        what = str(report.get("activity", "?"))
        if report.get("step") is None:
            what = f"(between steps) {what}"
        elif report.get("step") != step:
            what = f"(step {report.get('step')}) {what}"
        groups.setdefault(what, []).append(rank)
    by_kind = sorted(groups.items(), key=lambda kv: ("not in a collective" not in kv[0], kv[1]))
    parts = [f"{_ranks(ranks)} {what}" for what, ranks in by_kind]
    silent = [r for r in range(world_size) if r not in reports]
    if silent:
        parts.append(f"{_ranks(silent)} sent no report (gone, or stuck holding the GIL)")
    return (
        f"moetrain: step {step} exceeded parallel.timeout_s={timeout_s:g} s: "
        f"{'; '.join(parts)}; diagnosis in {run_dir}/hang-rank*.txt"
    )


class Watchdog:
    """The per-rank watchdog (module docstring). ``timeout_s``: the longest an armed interval
    may last (``parallel.timeout_s``); ``grace_s``: how long rank 0 waits for the others'
    reports. ``exit_fn`` and ``stream`` are for tests (default ``os._exit`` and stderr)."""

    def __init__(
        self,
        run_dir: Path | str,
        rank: int,
        world_size: int,
        timeout_s: float,
        grace_s: float = 5.0,
        exit_fn: Callable[[int], Any] = os._exit,
        stream: TextIO | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"parallel.timeout_s must be > 0, got {timeout_s}")
        self.run_dir, self.rank, self.world_size = Path(run_dir), rank, world_size
        self.timeout_s, self.grace_s = float(timeout_s), float(grace_s)
        self.poll_s = min(1.0, self.timeout_s / 10)
        self._exit, self._stream = exit_fn, stream
        # (step, perf_counter at arming) while armed, else None; one reference: atomic to swap
        self._armed: tuple[int, float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_wall = 0.0
        self.fired = False

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is not None:
            return
        self.started_wall = time.time()
        self._thread = threading.Thread(target=self._loop, name="moetrain-watchdog", daemon=True)
        self._thread.start()

    def step_begin(self, step: int) -> None:
        """Arm the clock for ``step`` (re-arming restarts it)."""
        self._armed = (step, time.perf_counter())

    def step_end(self) -> None:
        """Disarm: the rank is between watched intervals."""
        self._armed = None

    def stop(self) -> None:
        """Stop the thread (end of training; a no-op if never started)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.poll_s + 5)
        self._thread = None

    # --- the thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            armed = self._armed
            if armed is not None and time.perf_counter() - armed[1] > self.timeout_s:
                self._fire(armed, {"rank": self.rank, "step": armed[0]})
                return
            alarm = _read_fresh(self.run_dir / ALARM_FILE, self.started_wall)
            if alarm is not None:
                try:
                    raised = dict(json.loads(alarm))
                except ValueError:  # being replaced: read it at the next poll
                    continue
                self._fire(armed, raised)
                return

    def _fire(self, armed: tuple[int, float] | None, alarm: dict[str, Any]) -> None:
        """Report, raise the alarm, summarize (rank 0) or wait for the summary, exit."""
        self.fired = True
        self._write_report(armed)
        alarm_path = self.run_dir / ALARM_FILE
        if _read_fresh(alarm_path, self.started_wall) is None:  # the first to fire says so
            _write_atomically(alarm_path, lambda f: json.dump(alarm, f))
        if self.rank == 0:
            self._summarize(int(alarm.get("step", -1)))
        else:
            self._await_summary()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._exit(HANG_EXIT_CODE)

    def _write_report(self, armed: tuple[int, float] | None) -> None:
        now = time.perf_counter()
        snap = activity.current()
        step = armed[0] if armed is not None else None
        record = {
            "rank": self.rank,
            "step": step,
            "activity": snap.describe(),
            "written": time.time(),
        }
        ran = f"has run for {now - armed[1]:.1f} s" if armed is not None else "(not in a step)"

        def write(f: TextIO) -> None:
            f.write("moetrain hang report\n")
            f.write(f"{_SUMMARY_KEY}{json.dumps(record)}\n")
            f.write(
                f"rank {self.rank} of {self.world_size}, pid {os.getpid()}, "
                f"host {socket.gethostname()}\n"
            )
            f.write(f"step {step} {ran} (parallel.timeout_s={self.timeout_s:g})\n")
            f.write(f"activity: {snap.describe()} ({snap.durations(now)})\n\n")
            f.write("Python stack of every thread (most recent call first):\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)

        _write_atomically(report_path(self.run_dir, self.rank), write)

    def _collect_reports(self) -> dict[int, dict[str, Any]]:
        """Every rank's fresh report, waiting up to ``grace_s`` for the missing ones."""
        reports: dict[int, dict[str, Any]] = {}
        deadline = time.perf_counter() + self.grace_s
        while True:
            for rank in range(self.world_size):
                if rank in reports:
                    continue
                text = _read_fresh(report_path(self.run_dir, rank), self.started_wall)
                parsed = parse_report(text) if text is not None else None
                if parsed is not None:
                    reports[rank] = parsed
            if len(reports) == self.world_size or time.perf_counter() > deadline:
                return reports
            time.sleep(min(0.2, self.poll_s))

    def _summarize(self, step: int) -> None:
        line = summary_line(
            step, self.timeout_s, self.world_size, self._collect_reports(), self.run_dir
        )
        print(line, file=self._stream or sys.stderr, flush=True)
        _write_atomically(self.run_dir / SUMMARY_FILE, lambda f: f.write(line + "\n"))

    def _await_summary(self) -> None:
        deadline = time.perf_counter() + 3 * self.grace_s
        while time.perf_counter() < deadline:
            if _read_fresh(self.run_dir / SUMMARY_FILE, self.started_wall) is not None:
                return
            time.sleep(min(0.2, self.poll_s))
        # rank 0 did not summarize (gone, or outside any step and stuck): speak for this rank
        print(
            f"moetrain: rank {self.rank}: watchdog fired (parallel.timeout_s="
            f"{self.timeout_s:g} s) and rank 0 gave no summary; see "
            f"{report_path(self.run_dir, self.rank)}",
            file=self._stream or sys.stderr,
            flush=True,
        )
