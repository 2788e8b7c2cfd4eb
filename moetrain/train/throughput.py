"""Throughput a user can trust: tokens/s and MFU averaged over the log interval, and the peak
GEMM rate MFU is measured against.

A logged row's ``tokens_per_s`` is the tokens of every step since the previous logged row over
the wall time since then, less the time spent in evaluations and checkpoint saves (reported on
their own): one step's time is too noisy to report (one default CPU run logged 45 to 6,128
tok/s). ``mfu`` is ``tokens_per_s * flops_per_token / (peak_flops_per_device * world_size)``.

The peak is ``train.peak_flops_per_device`` when set, else a known GPU's bf16 table value, else
measured at start on this device: a GEMM ``(A @ B).sum().backward()`` (``3 * 2 * n**3`` FLOPs)
repeated after warm-up calls, and the best repetition taken (other processes sharing the cores
only ever slow a repetition down). ``run_meta.json`` records the value, its source and the
measured repetitions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

# bf16 dense peak per GPU, FLOP/s (vendor figures, no sparsity)
KNOWN_GPU_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
PEAK_N = 2048


def interval_rate(tokens: int, start: float, end: float, excluded: float = 0.0) -> float:
    """Tokens per second over the wall time ``start..end`` less ``excluded`` seconds (0.0 for an
    empty or zero-length interval)."""
    seconds = end - start - excluded
    return tokens / seconds if tokens and seconds > 0 else 0.0


def model_flops_utilization(
    tokens_per_s: float, flops_per_token: float, peak_flops_per_device: float, world_size: int
) -> float:
    """The fraction of the launch's peak the model's FLOPs ran at (0.0 without a peak)."""
    if peak_flops_per_device <= 0:
        return 0.0
    return tokens_per_s * flops_per_token / (peak_flops_per_device * world_size)


class ThroughputWindow:
    """The tokens and wall time since the previous logged row. ``add_step`` after each
    optimizer step; ``paused()`` around evaluations and saves; ``take(now)`` at a logged row
    returns the window's tokens/s and starts the next window at ``now``."""

    def __init__(self, now: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock  # what ``paused`` times with
        self.start, self.tokens, self.excluded = now, 0, 0.0

    def add_step(self, tokens: int) -> None:
        self.tokens += tokens

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside out of the window."""
        begin = self.clock()
        try:
            yield
        finally:
            self.excluded += self.clock() - begin

    def take(self, now: float) -> float:
        rate = interval_rate(self.tokens, self.start, now, self.excluded)
        self.start, self.tokens, self.excluded = now, 0, 0.0
        return rate


@dataclass
class PeakFlops:
    """The peak FLOP/s per device MFU divides by, where it comes from, and (measured) the rate
    of each timed repetition."""

    value: float
    source: str
    samples: list[float] = field(default_factory=list)

    def as_meta(self) -> dict:
        return {
            "peak_flops_per_device": self.value,
            "peak_flops_source": self.source,
            "peak_flops_samples": self.samples,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rates(
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    n: int = PEAK_N,
    warmup: int = 2,
    repeats: int = 5,
    min_seconds: float = 1.0,
    max_repeats: int = 20,
) -> list[float]:
    """FLOP/s of each timed ``(A @ B).sum().backward()`` on ``n x n`` matrices, after
    ``warmup`` untimed calls: at least ``repeats`` repetitions, more (up to ``max_repeats``)
    until ``min_seconds`` of timed work."""
    a = torch.randn(n, n, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(n, n, device=device, dtype=dtype, requires_grad=True)

    def call() -> None:
        a.grad = b.grad = None
        (a @ b).sum().backward()

    for _ in range(warmup):
        call()
    rates: list[float] = []
    spent = 0.0
    while len(rates) < repeats or (spent < min_seconds and len(rates) < max_repeats):
        _sync(device)
        begin = time.perf_counter()
        call()
        _sync(device)
        seconds = time.perf_counter() - begin
        spent += seconds
        rates.append(3 * 2 * n**3 / seconds)
    return rates


def peak_flops_per_device(
    configured: float | None,
    device: torch.device | None = None,
    n: int = PEAK_N,
    repeats: int = 5,
    min_seconds: float = 1.0,
) -> PeakFlops:
    """``configured`` (``train.peak_flops_per_device``), else a known GPU's table value, else
    the best repetition of :func:`gemm_rates` on ``device`` (fp32 on CPU, bf16 on a GPU)."""
    if configured:
        return PeakFlops(configured, "configured (train.peak_flops_per_device)")
    device = device or torch.device("cpu")
    dtype = torch.float32
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_GPU_PEAK.items():
            if key in name:
                return PeakFlops(value, f"{key} bf16 table value")
        dtype = torch.bfloat16
    rates = gemm_rates(device, dtype, n, repeats=repeats, min_seconds=min_seconds)
    kind = "fp32" if dtype == torch.float32 else "bf16"
    source = f"measured: best of {len(rates)} {kind} {n}^3 matmul fwd+bwd after warm-up"
    return PeakFlops(max(rates), source, rates)
