"""tools/bench_data_loader.py's machinery: how much of a slow data source ``PrefetchingBatches``
hides behind the training step, at several prefetch depths.

A ``SlowSource`` is a real ``BatchIterator`` (random tokens in memory) that sleeps before some
batches: ``delay_s`` before every ``every``-th one (``every=1``: all of them; larger: bursts).
Sleeping models waiting on storage (page faults of a memory-mapped token file), which, like the
numpy copies of real batch assembly, releases the GIL; a source that computed in Python while
holding the GIL could not be hidden by a thread. The simulated step either sleeps (a GPU step:
the host waits on the device) or multiplies matrices on the CPU until its duration is up.

Per step: ``data_wait_s`` = ``PrefetchingBatches.last_wait_s`` (what the trainer logs), step time
= wall time of fetching plus the simulated step. ``hidden`` = 1 - (sum of waits) / (sum of the
injected delays) over the counted steps; ``model`` is what an ideal prefetcher hides: nothing
at depth 0; with a slow batch every step, ``min(step, delay) / delay`` at any depth >= 1 (the
source's throughput caps it); with bursts (fast batches in between refill the queue),
``min(depth * step, delay) / delay``. Not a test: figures are only comparable within one run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from moetrain.data.batches import Batch, BatchIterator
from moetrain.data.dataset import WindowDataset
from moetrain.data.prefetch import PrefetchingBatches
from moetrain.data.sampler import ShuffledSampler

STEP_KINDS = ("sleep", "matmul")
SEQ_LEN, MICRO_BATCH, GLOBAL_BATCH = 256, 4, 32
NUM_TOKENS = 1 << 20


@dataclass(frozen=True)
class Scenario:
    """A source slow by ``delay_s`` on every ``every``-th batch, and a step of ``step_s``."""

    name: str
    delay_s: float
    step_s: float
    every: int = 1

    def is_slow(self, index: int) -> bool:
        """Whether batch ``index`` (0-based) is delayed: the last of each group of ``every``."""
        return index % self.every == self.every - 1

    def model_hidden(self, depth: int) -> float:
        """The share of the delay an ideal prefetcher of ``depth`` hides (module docstring)."""
        if depth == 0:
            return 0.0
        ahead = self.step_s if self.every == 1 else depth * self.step_s
        return min(ahead, self.delay_s) / self.delay_s


def default_scenarios(
    delay_s: float, step_s: float, burst_every: int, burst_delay_s: float
) -> list[Scenario]:
    """Steady with step >= delay, the same with the two swapped (source-bound), and bursts."""
    fast, slow = sorted((delay_s, step_s))
    return [
        Scenario("steady", delay_s=fast, step_s=slow),
        Scenario("source-bound", delay_s=slow, step_s=fast),
        Scenario("burst", delay_s=burst_delay_s, step_s=step_s, every=burst_every),
    ]


class SlowSource:
    """A ``BatchIterator`` over random tokens that sleeps before the scenario's slow batches."""

    def __init__(self, scenario: Scenario, seed: int = 0) -> None:
        tokens = np.random.default_rng(seed).integers(0, 50_000, NUM_TOKENS).astype(np.uint16)
        data = WindowDataset(tokens, SEQ_LEN)
        self.inner = BatchIterator(data, ShuffledSampler(len(data), seed), MICRO_BATCH)
        self.scenario = scenario
        self.calls = 0

    def next_global_batch(self, global_batch_size: int) -> list[Batch]:
        index, self.calls = self.calls, self.calls + 1
        if self.scenario.is_slow(index):
            time.sleep(self.scenario.delay_s)
        return self.inner.next_global_batch(global_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def simulated_step(seconds: float, kind: str) -> None:
    """Sleep (the host waiting on a device) or multiply 256x256 matrices until ``seconds``."""
    if kind == "sleep":
        time.sleep(seconds)
        return
    if kind != "matmul":
        raise ValueError(f"step kind must be one of {STEP_KINDS}, got {kind!r}")
    deadline = time.perf_counter() + seconds
    a = torch.randn(256, 256)
    while time.perf_counter() < deadline:
        a = torch.tanh(a @ a)  # tanh keeps the values bounded


def measure(
    scenario: Scenario, depth: int, steps: int, warmup: int, step_kind: str = "sleep"
) -> dict[str, Any]:
    """One (scenario, depth) run of ``steps`` steps; the first ``warmup`` are not counted."""
    waits, step_times = [], []
    with PrefetchingBatches(SlowSource(scenario), GLOBAL_BATCH, depth) as batches:
        for i in range(steps):
            start = time.perf_counter()
            batches.next_global_batch(GLOBAL_BATCH)
            wait = batches.last_wait_s
            simulated_step(scenario.step_s, step_kind)
            if i >= warmup:
                waits.append(wait)
                step_times.append(time.perf_counter() - start)
    injected = sum(scenario.delay_s for i in range(warmup, steps) if scenario.is_slow(i))
    return {
        "scenario": scenario.name,
        "depth": depth,
        "data_wait_s": float(np.mean(waits)),
        "max_wait_s": float(np.max(waits)),
        "step_s": float(np.mean(step_times)),
        "hidden": 1.0 - sum(waits) / injected if injected else float("nan"),
        "model_hidden": scenario.model_hidden(depth),
    }


def run(
    scenarios: list[Scenario],
    depths: list[int],
    steps: int,
    warmup: int,
    step_kind: str = "sleep",
) -> dict[str, Any]:
    """Every scenario at every depth: ``{"setup": ..., "rows": [measure(...), ...]}``."""
    if steps <= warmup:
        raise ValueError(f"steps ({steps}) must exceed warmup ({warmup})")
    rows = [measure(s, d, steps, warmup, step_kind) for s in scenarios for d in depths]
    setup = {
        "scenarios": [asdict(s) for s in scenarios],
        "steps": steps,
        "warmup": warmup,
        "step_kind": step_kind,
        "global_batch": GLOBAL_BATCH,
        "micro_batch": MICRO_BATCH,
        "seq_len": SEQ_LEN,
    }
    return {"setup": setup, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    """One table: per scenario and depth, the mean and max data wait, step time, hidden share."""
    setup = result["setup"]
    by_name = {s["name"]: s for s in setup["scenarios"]}
    lines = [
        f"{setup['steps'] - setup['warmup']} steps counted per row (after {setup['warmup']} "
        f"warm-up), step = {setup['step_kind']}, G={setup['global_batch']} x "
        f"S={setup['seq_len']}; times in ms",
        f"{'scenario':13} {'delay':>6} {'every':>5} {'step':>6} {'depth':>5} {'wait':>7} "
        f"{'max wait':>8} {'step time':>9} {'hidden':>7} {'model':>6}",
    ]
    for r in result["rows"]:
        s = by_name[r["scenario"]]
        delay_ms, step_ms = s["delay_s"] * 1e3, s["step_s"] * 1e3
        lines.append(
            f"{r['scenario']:13} {delay_ms:6.1f} {s['every']:5d} {step_ms:6.1f} "
            f"{r['depth']:5d} {r['data_wait_s'] * 1e3:7.2f} {r['max_wait_s'] * 1e3:8.2f} "
            f"{r['step_s'] * 1e3:9.2f} {r['hidden']:7.0%} {r['model_hidden']:6.0%}"
        )
    return "\n".join(lines)
