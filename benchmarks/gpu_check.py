"""The one-shot GPU check behind ``tools/gpu_check.py`` (docs/benchmarks.md, "GPU check").

Four parts, in order, each timed and reported even when an earlier one failed:

1. ``build``: the csrc extension. On a GPU: ``python setup.py build_ext --inplace`` with a CUDA
   toolkit (``CUDA_HOME``), then the CUDA kernels must be registered. With ``--cpu``: built only
   when the extension does not load already (probed in a subprocess).
2. ``selfcheck``: ``moetrain.ops.self_check`` on the CPU and, on a GPU, on CUDA: compiled kernels
   against the pure-torch references.
3. ``tests``: every ``gpu``-marked test (pytest in a subprocess, over the test files that mention
   ``mark.gpu``); on a machine without CUDA they are collected and skipped. A test file that cannot
   be imported because hydra-core, omegaconf or wandb is missing (the GPU image has none) is listed
   as not collected; any other failure or error fails the part.
4. ``training``: a Mixtral-shaped layer stack trained with ``experts_impl=grouped_mm`` and with
   ``loop`` (:mod:`benchmarks.gpu_check_train`).

The result is one JSON object (:func:`run_check`); ``ok`` is false when any part failed, and
``failures`` says which and why in one line each. Nothing here imports hydra-core, omegaconf or
wandb, and ``moetrain.ops`` is imported only after the build (a process loads the extension once).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_ABSENT = ("hydra", "omegaconf", "wandb")  # not on the GPU image (docs/development.md)
BUILD_TIMEOUT_S = 360  # csrc with CUDA on 16 cores: 1 to 3 minutes
TESTS_TIMEOUT_S = 240
TAIL_CHARS = 3000

Part = Callable[["Options"], dict[str, Any]]


@dataclass
class Options:
    """What to run: ``cpu`` (everything that runs without CUDA, a tiny model), ``steps``
    (training steps per experts_impl; None = 20 on a GPU, 3 with ``cpu``), ``skip_build`` (use
    the extension as it is), ``skip_tests``."""

    cpu: bool = False
    steps: int | None = None
    skip_build: bool = False
    skip_tests: bool = False

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.cpu else torch.device("cuda", 0)


def log(message: str) -> None:
    """Progress on stderr: stdout carries only the JSON object."""
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


def tail(text: str, chars: int = TAIL_CHARS) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


# --- the parts -----------------------------------------------------------------------------------


def _probe_extension() -> str | None:
    """In a fresh process: None when the csrc extension loads, else why not."""
    code = "from moetrain.ops.backend import extension_error as e; print(e() or '', end='')"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    if proc.returncode:
        return f"probe failed: {tail(proc.stderr, 500)}"
    return proc.stdout or None


def _build_ext(result: dict[str, Any], cuda: bool) -> bool:
    """``setup.py build_ext --inplace`` into ``result``; True when it exited 0."""
    if cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            result["error"] = (
                "no CUDA toolkit found: set CUDA_HOME to one with nvcc (csrc's CUDA kernels "
                "are compiled here)"
            )
            return False
        result["cuda_home"] = CUDA_HOME
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))}
    log("building csrc: " + " ".join(cmd[1:]))
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        result["error"] = f"the csrc build took over {BUILD_TIMEOUT_S} s"
        return False
    result["command"] = " ".join(cmd[1:])
    if proc.returncode:
        result["log_tail"] = tail(proc.stdout + proc.stderr)
        print(result["log_tail"], file=sys.stderr)
        result["error"] = f"the csrc build failed (exit {proc.returncode}); see log_tail"
        return False
    return True


def part_build(opts: Options) -> dict[str, Any]:
    """Build the extension (see the module docstring) and load it in this process; ok when it
    loads and, on a GPU, registers the CUDA kernels."""
    result: dict[str, Any] = {"action": "skipped" if opts.skip_build else "built"}
    if os.environ.get("MOETRAIN_NO_CSRC") == "1":
        result["error"] = (
            "MOETRAIN_NO_CSRC=1 disables the csrc extension this check tests; unset it"
        )
        return {"ok": False, **result}
    if not opts.skip_build:
        if opts.cpu and _probe_extension() is None:
            result["action"] = "already built"
        elif not _build_ext(result, cuda=not opts.cpu):
            return {"ok": False, **result}
    from moetrain.ops import active_backend, extension_error
    from moetrain.ops.backend import compiled_ops

    keys = ["CPU"] if opts.cpu else ["CPU", "CUDA"]
    result["extension_error"] = extension_error()
    result["compiled_ops"] = {key: compiled_ops(key) for key in keys}
    result["backend"] = {key: active_backend(key) for key in keys}
    missing = [key for key in keys if not result["compiled_ops"][key]]
    if result["extension_error"] is not None:
        result["error"] = f"the extension does not load: {result['extension_error']}"
    elif missing:
        result["error"] = f"the extension has no {'/'.join(missing)} kernels (built without CUDA?)"
    return {"ok": "error" not in result, **result}


def part_selfcheck(opts: Options) -> dict[str, Any]:
    """``self_check`` on each device kind this mode covers; ok when every one passed."""
    from moetrain.ops import self_check, selfcheck_results

    devices = ["cpu"] if opts.cpu else ["cpu", str(opts.device)]
    status = {device: self_check(device)["status"] for device in devices}
    bad = {device: s for device, s in status.items() if s != "passed"}
    result: dict[str, Any] = {"ok": not bad, "status": status, "results": selfcheck_results()}
    if bad:
        result["error"] = ", ".join(f"{d}: {s}" for d, s in bad.items())
    return result


def gpu_test_files(root: Path = ROOT) -> list[str]:
    """The test files (relative to ``root``) that mention ``mark.gpu``: collecting the whole suite
    would import modules the GPU image lacks."""
    files = sorted((root / "tests").rglob("test_*.py"))
    return [str(f.relative_to(root)) for f in files if "mark.gpu" in f.read_text()]


def parse_junit(xml_text: str) -> dict[str, Any]:
    """Counts from a pytest ``--junitxml`` report: ``passed``, ``failed``, ``errors``,
    ``skipped``; ``failed_tests`` (ids of failures and errors); ``not_collected``: modules whose
    import failed for want of one of :data:`OPTIONAL_ABSENT` (``{"module", "missing"}``), which
    are not counted as errors."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    not_collected: list[dict[str, str]] = []
    for case in ET.fromstring(xml_text).iter("testcase"):
        test_id = ".".join(p for p in (case.get("classname"), case.get("name")) if p)
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
        elif outcome.tag == "failure":
            counts["failed"] += 1
            failed.append(test_id)
        else:
            missing = re.search(r"No module named '([\w.]+)'", outcome.text or "")
            top = missing.group(1).partition(".")[0] if missing else None
            if outcome.get("message") == "collection failure" and top in OPTIONAL_ABSENT:
                not_collected.append({"module": test_id, "missing": top})
            else:
                counts["errors"] += 1
                failed.append(test_id)
    return {**counts, "failed_tests": failed, "not_collected": not_collected}


def part_tests(opts: Options) -> dict[str, Any]:
    """``pytest -m gpu`` over :func:`gpu_test_files` in a subprocess; ok when nothing failed or
    errored (skips and :func:`parse_junit`'s not-collected modules are reported, not failures)."""
    if opts.skip_tests:
        return {"ok": True, "action": "skipped"}
    files = gpu_test_files()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        # hydra-core's pytest plugin, where it is installed, is not needed and imports omegaconf
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
        cmd += ["-p", "no:hydra_pytest"]
        cmd += ["--continue-on-collection-errors", f"--junitxml={junit}", *files]
        log(f"running the gpu-marked tests in {len(files)} files")
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "files": files, "error": f"pytest ran over {TESTS_TIMEOUT_S} s"}
        output = proc.stdout + proc.stderr
        if not junit.exists():
            why = f"pytest wrote no report (exit {proc.returncode}); see log_tail"
            return {"ok": False, "files": files, "log_tail": tail(output), "error": why}
        counts = parse_junit(junit.read_text())
    result = {"files": files, "returncode": proc.returncode, **counts}
    bad = counts["failed"] + counts["errors"]
    if bad:
        result["log_tail"] = tail(output)
        result["error"] = f"{counts['failed']} failed, {counts['errors']} errors"
    return {"ok": not bad, **result}


def part_training(opts: Options) -> dict[str, Any]:
    """The training runs (imported here: the model imports ``moetrain.ops``)."""
    from benchmarks.gpu_check_train import run_training

    return run_training(opts.device, opts.steps)


PARTS: dict[str, Part] = {
    "build": part_build,
    "selfcheck": part_selfcheck,
    "tests": part_tests,
    "training": part_training,
}


# --- running and reporting -----------------------------------------------------------------------


def run_part(name: str, fn: Part, opts: Options) -> dict[str, Any]:
    """``fn(opts)`` with its wall time; an exception becomes ``{"ok": False, "error": ...}``."""
    log(f"{name} ...")
    start = time.perf_counter()
    try:
        result = fn(opts)
    except Exception as err:  # a part that raises has failed; the others still run
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    result["seconds"] = round(time.perf_counter() - start, 2)
    log(f"{name}: {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']} s")
    return result


def failures(parts: dict[str, dict[str, Any]]) -> list[str]:
    """One line per failed part (and per failed training run): ``part: why``."""
    lines = []
    for name, result in parts.items():
        if result.get("ok"):
            continue
        why = result.get("error")
        if why is None and name == "training":
            why = "; ".join(
                f"{impl}: {run.get('error', 'failed')}"
                for impl, run in result.get("runs", {}).items()
                if not run.get("ok")
            )
        lines.append(f"{name}: {why or 'failed'}")
    return lines


def environment(opts: Options) -> dict[str, Any]:
    """Versions, the device, and which of the optional packages are importable."""
    optional = {}
    for name in OPTIONAL_ABSENT:
        try:
            optional[name] = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a blocked or broken package: not importable
            optional[name] = False
    cuda = not opts.cpu
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "optional_packages": optional,
    }


def run_check(opts: Options, parts: dict[str, Part] | None = None) -> dict[str, Any]:
    """Every part (``parts`` replaces :data:`PARTS`, for tests) and the report: ``ok``,
    ``failures``, ``mode``, ``environment``, ``wall_s`` and one entry per part."""
    start = time.perf_counter()
    results = {name: run_part(name, fn, opts) for name, fn in (parts or PARTS).items()}
    lines = failures(results)
    return {
        "ok": not lines,
        "failures": lines,
        "mode": "cpu" if opts.cpu else "cuda",
        "environment": environment(opts),
        "wall_s": round(time.perf_counter() - start, 2),
        **results,
    }
