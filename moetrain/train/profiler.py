"""``train.profile_steps=[a, b]``: a ``torch.profiler`` trace of optimizer steps a..b.

Every rank writes ``<run dir>/profile/rank<R>-steps<a>-<b>.json`` (Chrome trace format: open it
in Perfetto or chrome://tracing). Each step is a ``train step <n>`` range; inside, the MoE
layers' phases are ranges of their own (``torch.profiler.record_function`` in the layer and the
dispatchers): ``moe/router``, ``moe/dispatcher`` (everything the dispatcher runs: the three
below, the shared experts), ``moe/dispatch``, ``moe/experts`` and ``moe/combine``. CUDA kernels
are recorded too when the run is on CUDA. A run resumed inside the window profiles the steps it
runs (the file name says which); one resumed past it profiles nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from moetrain.train.callbacks import Callback
from moetrain.train.tracking import Tracker

if TYPE_CHECKING:
    from moetrain.train.trainer import Trainer


class ProfileSteps(Callback):
    """Profiles the steps ``first..last`` (``steps``: ``[first, last]``, or None for none)."""

    def __init__(self, steps: list[int] | None, run_dir: Path, rank: int) -> None:
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.dir, self.rank = run_dir / "profile", rank
        self.prof: profile | None = None
        self.step_range: record_function | None = None
        self.started_at = 0
        self.trace: Path | None = None  # written

    def pre_step(self, trainer: Trainer, step: int) -> None:
        if self.prof is None and self.trace is None and self.first <= step <= self.last:
            activities = [ProfilerActivity.CPU]
            if trainer.ctx.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self.prof = profile(activities=activities)
            self.prof.__enter__()
            self.started_at = step
        if self.prof is not None:
            self.step_range = record_function(f"train step {step}")
            self.step_range.__enter__()

    def post_step(self, trainer: Trainer, step: int, row: dict[str, Any] | None) -> None:
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None
        if self.prof is not None and step >= self.last:
            self._finish(step, trainer.ctx.is_logging_rank)

    def post_train(self, trainer: Trainer, tracker: Tracker) -> None:
        if self.prof is not None:  # the run ended inside the window
            self._finish(trainer.step, trainer.ctx.is_logging_rank)

    def _finish(self, step: int, announce: bool) -> None:
        assert self.prof is not None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trace = self.dir / f"rank{self.rank}-steps{self.started_at}-{step}.json"
        self.prof.export_chrome_trace(str(self.trace))
        self.prof = None
        if announce:
            print(
                f"moetrain: profile of steps {self.started_at}..{step} in {self.trace}", flush=True
            )
