"""Measuring speed: the machine's peak GEMM rate, MoE expert FLOPs, and timing helpers.

The figure of merit for an MoE layer is its **fraction of the machine's peak** (docs/benchmarks.md):
``(expert FLOPs / peak FLOP/s) / layer time``, with the peak measured in the same process, with
the same thread count, as ``(A @ B).sum().backward()`` on 2048x2048 fp32 matrices.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

PEAK_N = 2048


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_peak_flops(repeats: int = 5, device: str = "cpu", n: int = PEAK_N) -> float:
    """Peak GEMM FLOP/s: ``3 * 2 * n**3 / time((A @ B).sum().backward())`` (forward plus the two
    backward GEMMs), fp32, measured here with the current thread count."""
    a = torch.randn(n, n, device=device, requires_grad=True)
    b = torch.randn(n, n, device=device, requires_grad=True)

    def step() -> None:
        a.grad = b.grad = None
        (a @ b).sum().backward()

    return 3 * 2 * n**3 / median_time(step, repeats=repeats)


def expert_flops(routed_rows: int, dim: int, hidden_dim: int, activation: str = "swiglu") -> int:
    """Forward + backward FLOPs of the routed experts: ``3 * 2 * rows * (GEMMs per row)`` with
    ``3*D*F`` multiply-adds per row for SwiGLU (``2*D*F`` for GELU). ``routed_rows`` counts the
    rows actually computed (no dropped assignments, no padding)."""
    macs_per_row = (3 if activation == "swiglu" else 2) * dim * hidden_dim
    return 3 * 2 * routed_rows * macs_per_row


def fraction_of_peak(flops: float, seconds: float, peak_flops: float) -> float:
    """``(flops / peak) / seconds``: 1.0 means the layer ran its expert GEMMs at the peak rate."""
    return flops / peak_flops / seconds


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def retain_freed_memory() -> None:
    """Make this process's glibc malloc keep freed memory for reuse instead of returning it to
    the kernel: no ``mmap`` for large blocks, no trimming of the heap. By default every block of
    32 MB or more (an ``[R, D]`` row tensor of the fine-grained shape is 64 MB) is mapped fresh
    and unmapped on free, so each new one costs page faults on first touch (docs/benchmarks.md);
    a caching allocator (jemalloc, tcmalloc via ``LD_PRELOAD``) has the same effect. The process's
    resident memory then stays at its high-water mark. Benchmarks apply it to every peer alike;
    raises ``OSError`` where there is no glibc."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt"):
        raise OSError("retain_freed_memory needs glibc's mallopt")
    for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)):
        if libc.mallopt(param, value) != 1:
            raise OSError(f"mallopt({param}, {value}) failed")
