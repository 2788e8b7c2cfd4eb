"""First-use self-check of the compiled csrc kernels against the pure-torch references.

The first time a ``moetrain`` op runs on a device type (``cpu`` or ``cuda``) in a process, and a
compiled kernel is registered for that dispatch key, every op with such a kernel is run on a
small seeded random problem and compared with its pure-torch reference (a few ms; see
:func:`_problem` for what it covers). Then:

* all agree: the compiled kernels stay; the outcome is recorded as ``passed``.
* any disagrees (or raises): the process warns once (:class:`CsrcSelfCheckWarning`, naming the
  op(s) and the device) and registers the references over that dispatch key for the rest of
  the process — for *all* moetrain ops on that device, not only the bad one: the kernels share
  their build, helpers and toolchain, so one wrong result means none of them is trusted, and one
  backend per device is what :func:`moetrain.ops.active_backend` can state in one line.

The check runs at most once per device type per process (the fallback is per dispatch key, so
per type, not per index); after it, the hook is one set lookup. It is skipped, and runs on a
later eager call instead, while ``torch.compile`` traces, under a dispatch mode (fake tensors,
FLOP counters), for tensor subclasses, while a CUDA graph is captured, and inside
``reference_kernels()``. A compiled graph calls the ops without the hook: run
:func:`self_check` before compiling to have the check in a compile-only process. It draws from
its own generator, so the global RNG stream is unchanged.

Tolerances: integer outputs (``expert_sort``) must be equal. Float outputs (fp32) must satisfy
``|got - want| <= ATOL + RTOL * |want|`` with both 1e-5 (about 100 fp32 ulps at magnitude 1):
summation-order differences (the vector lanes of the weight gradient's dot product, the CUDA
reference's atomic ``index_add_``) stay far below it; a wrong row, weight or scale does not.
NaN must appear exactly where the reference has NaN.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

# device type -> dispatch key, for the device types the csrc extension builds kernels for
DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
RTOL = ATOL = 1e-5

_LOCK = threading.RLock()  # reentrant: the check's own op calls may reach the hook again
_DONE: set[str] = set()  # device types with a final outcome: the hook's fast path
_RESULTS: dict[str, dict[str, Any]] = {}  # dispatch key -> outcome (see selfcheck_results)
_FALLBACKS: dict[str, torch.library.Library] = {}  # dispatch key -> the references over it
_RUNNING: set[str] = set()  # dispatch keys being checked (no recursion into the check)
_POSTPONED: dict[str, int] = {}  # dispatch key -> open reference_kernels() blocks


class CsrcSelfCheckWarning(RuntimeWarning):
    """A compiled csrc kernel disagreed with the reference; the reference runs instead."""


# --- the hook ------------------------------------------------------------------------------


def ensure_checked(t: Tensor) -> None:
    """Run the self-check for ``t``'s device type unless it has run (or does not apply).

    Called by the public op wrappers and unpermute's backward; ``t`` only names the device.
    A no-op while tracing or when the check cannot run on real tensors now (see the module
    docstring); after the first real call it is one set lookup.
    """
    if torch.compiler.is_compiling():
        return
    # is_cpu / is_cuda: a fraction of t.device.type's cost on this per-call path
    device_type = "cpu" if t.is_cpu else "cuda" if t.is_cuda else None
    if device_type is None or device_type in _DONE:
        return
    key = DEVICE_KEYS[device_type]
    # fake, functional and other subclass tensors: tracing, not running (the check needs
    # real tensors on the device; it runs on the first eager call instead)
    if type(t) not in (Tensor, torch.nn.Parameter) or not _can_run_now(t.device):
        return
    with _LOCK:
        if device_type not in _DONE and key not in _RUNNING and not _POSTPONED.get(key):
            _check(t.device, key)


def _can_run_now(device: torch.device) -> bool:
    if torch.jit.is_tracing() or is_in_torch_dispatch_mode():
        return False
    # a CUDA graph capture forbids the check's host copies and syncs
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def self_check(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Run the self-check for ``device``'s type now (if it has not run) and return its outcome
    (one entry of :func:`selfcheck_results`). Eager use, e.g. before ``torch.compile``."""
    device = torch.device(device)
    key = DEVICE_KEYS.get(device.type)
    if key is None:
        raise ValueError(
            f"moetrain.ops.self_check: no csrc kernels exist for device type {device.type!r}; "
            f"pass one of {sorted(DEVICE_KEYS)}"
        )
    if torch.compiler.is_compiling() or not _can_run_now(device) or _POSTPONED.get(key):
        raise RuntimeError(
            "moetrain.ops.self_check() cannot run while torch.compile traces, a dispatch mode is "
            "active, a CUDA graph is captured or inside reference_kernels(); call it before"
        )
    if device.type == "cuda" and device.index is None:  # record which GPU was checked
        device = torch.device("cuda", torch.cuda.current_device())
    with _LOCK:
        if device.type not in _DONE and key not in _RUNNING:
            _check(device, key)
    return selfcheck_results()[key]


@contextlib.contextmanager
def postponed(device_key: str) -> Iterator[None]:
    """While inside, no first-use check runs on ``device_key``: the kernels registered there are
    temporary overrides (``reference_kernels()``), not the compiled ones to check."""
    with _LOCK:
        _POSTPONED[device_key] = _POSTPONED.get(device_key, 0) + 1
    try:
        yield
    finally:
        with _LOCK:
            _POSTPONED[device_key] -= 1


# --- the outcome ---------------------------------------------------------------------------


def selfcheck_results() -> dict[str, dict[str, Any]]:
    """The self-check's outcome per dispatch key (``"CPU"``, ``"CUDA"``), JSON-serialisable.

    Each entry: ``status`` — ``passed``, ``failed`` (the references run on that device),
    ``not_run`` (a compiled kernel exists, no op has run there yet) or ``not_applicable`` (no
    compiled kernel for the key); ``device`` the device checked (e.g. ``"cuda:0"``) or None;
    ``ms`` the check's wall time or None; ``ops``: op -> ``{"ok", "max_abs_diff", "detail"}``
    (``max_abs_diff`` over all its cases, None when not comparable — an exception, a shape,
    dtype or NaN mismatch — and then ``detail`` says why); ``failed_ops``: the ops that
    disagreed.
    """
    from moetrain.ops.backend import compiled_ops  # a cycle at import: backend imports us

    out = {}
    with _LOCK:
        for key in DEVICE_KEYS.values():
            if key in _RESULTS:
                out[key] = {**_RESULTS[key], "ops": dict(_RESULTS[key]["ops"])}
            else:
                status = "not_run" if compiled_ops(key) else "not_applicable"
                out[key] = _result(status, None, None, {})
    return out


def status_note(device_key: str) -> str:
    """The outcome for ``device_key`` in words, for :func:`moetrain.ops.active_backend`."""
    result = selfcheck_results()[device_key]
    if result["status"] == "failed":
        return f"csrc self-check failed on {device_key}: {_failure_summary(result)}"
    if result["status"] == "passed":
        return "self-check passed"
    return "self-check not run yet"


def _result(
    status: str, device: str | None, ms: float | None, ops: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    failed = [op for op, r in ops.items() if not r["ok"]]
    return {"status": status, "device": device, "ms": ms, "ops": ops, "failed_ops": failed}


def _failure_summary(result: dict[str, Any]) -> str:
    parts = []
    for op in result["failed_ops"]:
        r = result["ops"][op]
        diff = r["detail"] if r["max_abs_diff"] is None else f"max abs diff {r['max_abs_diff']:.3g}"
        parts.append(f"{op} {diff}")
    return "; ".join(parts)


def reset_for_tests() -> None:
    """TEST-ONLY: forget every outcome and remove the fallback registrations, so the next op
    call checks again. Production code never calls it: the check is once per process."""
    with _LOCK:
        for lib in _FALLBACKS.values():
            lib._destroy()
        _FALLBACKS.clear()
        _RESULTS.clear()
        _DONE.clear()


# --- the check -----------------------------------------------------------------------------


def _check(device: torch.device, key: str) -> None:
    """Check ``key``'s compiled kernels on ``device`` and record the outcome; on a mismatch
    register the references over ``key`` and warn. Called with ``_LOCK`` held."""
    from moetrain.ops.backend import REFERENCES, compiled_ops  # a cycle at import

    ops = compiled_ops(key)
    if not ops:
        _RESULTS[key] = _result("not_applicable", None, None, {})
        _DONE.add(device.type)
        return
    _RUNNING.add(key)
    try:
        start = time.perf_counter()
        per_op = _run_cases(device, ops)
        ms = (time.perf_counter() - start) * 1e3
    finally:
        _RUNNING.discard(key)
    result = _result("passed", str(device), round(ms, 3), per_op)
    if result["failed_ops"]:
        result["status"] = "failed"
        _fall_back(key, REFERENCES)
    _RESULTS[key] = result
    _DONE.add(device.type)
    if result["failed_ops"]:
        # after the fallback is in place: an error filter turning this into an exception
        # still leaves the process on the references
        _warn(device.type, result)


def _warn(device_type: str, result: dict[str, Any]) -> None:
    failed = result["failed_ops"]
    kernel, verb = ("kernel", "disagrees") if len(failed) == 1 else ("kernels", "disagree")
    warnings.warn(
        f"moetrain: csrc {kernel} {', '.join(failed)} on {device_type} {verb} with the pure-torch "
        f"reference ({_failure_summary(result)}); using the reference for all moetrain ops on "
        f"{device_type} from now on. The compiled extension is broken or stale: rebuild it "
        "(`pip install --no-build-isolation -e .`) or set MOETRAIN_NO_CSRC=1",
        CsrcSelfCheckWarning,
        stacklevel=4,  # past _warn, _check and the hook: the op wrapper, or self_check()'s caller
    )


def _fall_back(key: str, references: dict[str, Callable[..., Any]]) -> None:
    lib = torch.library.Library("moetrain", "IMPL")
    with warnings.catch_warnings():
        # registering over the compiled kernel warns "Overriding a previously registered kernel"
        warnings.simplefilter("ignore", UserWarning)
        for name, fn in references.items():
            lib.impl(name, fn, key, allow_override=True)  # torch 2.11 defaults to False
    _FALLBACKS[key] = lib  # kept alive: destroying it would restore the compiled kernels


def _problem(device: torch.device) -> list[tuple[str, tuple[Any, ...]]]:
    """(op name, args) cases: T=11 tokens (two never referenced), D=37 (not a multiple of a
    vector width: the tail paths run), R=29 rows with repeats and 3 padding rows that hold NaN
    (ignored whatever they hold); unweighted and weighted unpermute and its backward;
    expert_sort of 64 ids over 9 bins with 3 empty bins (ties in all others), and of no ids."""
    gen = torch.Generator().manual_seed(0x5E1F)  # own generator: the global RNG is untouched
    # drawn on the CPU whatever the default device, then moved: the same problem everywhere
    cpu: dict[str, Any] = {"generator": gen, "device": "cpu", "dtype": torch.float32}
    T, D, R = 11, 37, 29
    row_token = torch.randint(0, T - 2, (R,), generator=gen, device="cpu")
    row_token[[3, 17, 28]] = -1
    x = torch.randn(T, D, **cpu)
    rows = torch.randn(R, D, **cpu)
    rows[row_token < 0] = float("nan")
    weight = torch.rand(R, **cpu)
    grad_out = torch.randn(T, D, **cpu)
    used_bins = torch.tensor([1, 2, 3, 5, 6, 7], device="cpu")  # bins 0, 4 and 8 stay empty
    ids = used_bins[torch.randint(0, len(used_bins), (64,), generator=gen, device="cpu")]
    x, rows, weight, grad_out, row_token, ids = (
        t.to(device) for t in (x, rows, weight, grad_out, row_token, ids)
    )
    return [
        ("permute", (x, row_token)),
        ("unpermute", (rows, row_token, None, T)),
        ("unpermute", (rows, row_token, weight, T)),
        ("unpermute_backward", (grad_out, rows, row_token, weight)),
        ("expert_sort", (ids, 9)),
        ("expert_sort", (ids[:0], 3)),
    ]


def _run_cases(device: torch.device, ops: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each case of :func:`_problem` whose op is in ``ops`` (``moetrain::name``), through the
    dispatcher (the kernel registered for the device) and the reference, compared; per op the
    worst over its cases."""
    per_op: dict[str, dict[str, Any]] = {}
    # no autocast: the reference's einsum would run in bf16 inside an autocast region
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for name, args in _problem(device):
            op = f"moetrain::{name}"
            if op not in ops:
                continue
            diff, ok, detail = _run_case(name, args)
            prev = per_op.get(op, {"ok": True, "max_abs_diff": 0.0, "detail": None})
            worst = prev["max_abs_diff"]
            worst = None if diff is None or worst is None else max(diff, worst)
            per_op[op] = {
                "ok": prev["ok"] and ok,
                "max_abs_diff": worst,
                "detail": prev["detail"] or detail,
            }
    return per_op


def _run_case(name: str, args: tuple[Any, ...]) -> tuple[float | None, bool, str | None]:
    """``(max abs diff or None, within tolerance, why not comparable or None)`` for one case."""
    from moetrain.ops.backend import REFERENCES  # a cycle at import: backend imports us

    want = REFERENCES[name](*args)
    try:
        got = getattr(torch.ops.moetrain, name)(*args)
    except Exception as err:  # a kernel that raises disagrees too
        return None, False, f"raised {type(err).__name__}: {str(err).splitlines()[0]}"
    return _compare(got, want)


def _compare(got: Any, want: Any) -> tuple[float | None, bool, str | None]:
    """``(max abs diff, within tolerance, None)``, or ``(None, False, why)`` when the outputs
    are not comparable (count, shape, dtype or NaN pattern differ)."""
    got_t = got if isinstance(got, tuple) else (got,)
    want_t = want if isinstance(want, tuple) else (want,)
    if len(got_t) != len(want_t):
        return None, False, f"{len(got_t)} outputs, the reference {len(want_t)}"
    worst, ok = 0.0, True
    for g, w in zip(got_t, want_t):
        if g.shape != w.shape or g.dtype != w.dtype:
            why = f"output {list(g.shape)} {g.dtype}, the reference {list(w.shape)} {w.dtype}"
            return None, False, why
        g, w = g.cpu(), w.cpu()
        if g.dtype.is_floating_point:
            if not torch.equal(g.isnan(), w.isnan()):
                return None, False, "NaN where the reference has none, or the reverse"
            g, w = g.nan_to_num(0.0).double(), w.nan_to_num(0.0).double()
            err = (g - w).abs()
            ok = ok and bool((err <= ATOL + RTOL * w.abs()).all())
        else:
            err = (g.long() - w.long()).abs()
            ok = ok and not bool(err.any())
        if err.numel():
            worst = max(worst, float(err.max()))
    return worst, ok, None
