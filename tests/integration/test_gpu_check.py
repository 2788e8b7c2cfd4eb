"""``tools/gpu_check.py --cpu``: every part that runs without CUDA, as on the GPU machines' image
(hydra-core, omegaconf and wandb blocked), prints one JSON object and exits 0; a failed part
makes it exit 1 and says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain.testing.optional import blocker_source

ROOT = Path(__file__).resolve().parents[2]
IMPLS = {"grouped_mm", "loop"}
LEAVES = {"attention", "moe/router", "moe/dispatch", "moe/experts", "moe/combine"}

BLOCKER = blocker_source()  # hydra, omegaconf and wandb


def gpu_check(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the tool with the packages blocked (a sitecustomize on PYTHONPATH, inherited by the
    tool's own subprocesses); returns the process and its one JSON object."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    environ = {k: v for k, v in os.environ.items() if k != "MOETRAIN_NO_CSRC"}
    environ.update(PYTHONPATH=str(site), **env)
    proc = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--cpu", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=280,
    )
    try:
        report = json.loads(proc.stdout)  # the whole of stdout is one object
    except json.JSONDecodeError:
        pytest.fail(f"stdout is not one JSON object:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc, report


def check_run(run: dict) -> None:
    assert run["ok"] and run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1
    assert run["peak_memory_gib"] > 0 and run["loss_decreased"]
    split = run["split"]
    assert set(split["phases"]) >= LEAVES and split["other_ms"] >= 0
    for name in LEAVES:
        assert split["phases"][name]["forward_ms"] > 0, name
        assert split["phases"][name]["backward_ms"] > 0, name


@pytest.mark.timeout(300)
def test_cpu_check_passes_without_hydra_omegaconf_or_wandb(tmp_path):
    out = tmp_path / "report.json"
    proc, report = gpu_check(tmp_path, "--out", str(out))
    assert proc.returncode == 0, (report.get("failures"), proc.stderr[-3000:])
    assert report["ok"] is True and report["failures"] == [] and report["mode"] == "cpu"
    assert json.loads(out.read_text()) == report
    assert report["environment"]["optional_packages"] == {
        "hydra": False,
        "omegaconf": False,
        "wandb": False,
    }
    assert report["build"]["ok"] and report["build"]["backend"]["CPU"].startswith("csrc")
    assert report["selfcheck"]["results"]["CPU"]["status"] == "passed"
    tests = report["tests"]
    assert tests["ok"] and tests["failed"] == tests["errors"] == 0
    assert tests["skipped"] > 0  # collected, and skipped for want of CUDA
    training = report["training"]
    assert training["ok"] and set(training["runs"]) == IMPLS
    assert training["steps"] == {"warmup": 1, "timed": 1, "split": 1}
    for run in training["runs"].values():
        check_run(run)


@pytest.mark.timeout(300)
def test_a_failed_part_fails_the_check(tmp_path):
    """Without the extension the build and self-check parts fail; the rest still runs."""
    proc, report = gpu_check(tmp_path, "--skip-tests", MOETRAIN_NO_CSRC="1")
    assert proc.returncode == 1 and report["ok"] is False
    assert [line.partition(":")[0] for line in report["failures"]] == ["build", "selfcheck"]
    assert "MOETRAIN_NO_CSRC=1" in report["failures"][0]
    assert report["tests"] == {
        "ok": True,
        "action": "skipped",
        "seconds": report["tests"]["seconds"],
    }
    assert report["training"]["ok"] is True  # on the pure-torch reference ops
