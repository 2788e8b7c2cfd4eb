"""benchmarks.gpu_check's bookkeeping: a failed or raising part fails the report (and names
itself), pytest's JUnit report is counted right, and the training part's step plan and loss
verdict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import Options, failures, gpu_test_files, parse_junit, run_check
from benchmarks.gpu_check_train import _loss_problem, plan_steps

ROOT = Path(__file__).resolve().parents[2]

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="" name="tests.distributed.test_layouts"><error message="collection failure">
E   ModuleNotFoundError: No module named 'omegaconf'</error></testcase>
<testcase classname="" name="tests.unit.test_x"><error message="collection failure">
E   ModuleNotFoundError: No module named 'numpy.linalg'</error></testcase>
<testcase classname="tests.unit.test_a" name="test_ok" />
<testcase classname="tests.unit.test_a" name="test_ok2" />
<testcase classname="tests.unit.test_a" name="test_bad"><failure message="assert 0">E</failure>
</testcase>
<testcase classname="tests.unit.test_a" name="test_skip"><skipped message="no CUDA" /></testcase>
<testcase classname="tests.unit.test_c" name="test_e"><error message="failed on setup">x</error>
</testcase>
</testsuite></testsuites>"""


def ok_part(opts):
    return {"ok": True, "value": 1}


def test_every_part_runs_and_any_failure_fails_the_report():
    def failing(opts):
        return {"ok": False, "error": "2 failed, 0 errors"}

    def raising(opts):
        raise RuntimeError("CUDA out of memory")

    parts = {"build": ok_part, "tests": failing, "training": raising, "after": ok_part}
    report = run_check(Options(cpu=True), parts)
    assert report["ok"] is False
    assert report["failures"] == [
        "tests: 2 failed, 0 errors",
        "training: RuntimeError: CUDA out of memory",
    ]
    assert report["after"]["ok"] and report["build"]["value"] == 1  # later parts still ran
    assert all("seconds" in report[name] for name in parts)
    json.dumps(report)  # one JSON object
    assert run_check(Options(cpu=True), {"build": ok_part})["ok"] is True


def test_a_failed_training_run_is_named():
    runs = {"grouped_mm": {"ok": True}, "loop": {"ok": False, "error": "non-finite loss: [nan]"}}
    assert failures({"training": {"ok": False, "runs": runs}}) == [
        "training: loop: non-finite loss: [nan]"
    ]


def test_junit_counts_and_missing_optional_packages():
    counts = parse_junit(JUNIT)
    assert {k: counts[k] for k in ("passed", "failed", "errors", "skipped")} == {
        "passed": 2,
        "failed": 1,
        "errors": 2,  # numpy.linalg missing is an error; omegaconf missing is not
        "skipped": 1,
    }
    assert counts["not_collected"] == [
        {"module": "tests.distributed.test_layouts", "missing": "omegaconf"}
    ]
    assert counts["failed_tests"] == [
        "tests.unit.test_x",
        "tests.unit.test_a.test_bad",
        "tests.unit.test_c.test_e",
    ]


def test_gpu_test_files_are_those_that_mention_the_marker(tmp_path):
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    marker = "@pytest.mark." + "gpu"  # split: this file itself has no gpu-marked test
    (tmp_path / "tests" / "unit" / "test_gpu.py").write_text(f"{marker}\ndef test(): ...")
    (tmp_path / "tests" / "unit" / "test_cpu.py").write_text("def test(): ...")
    assert gpu_test_files(tmp_path) == ["tests/unit/test_gpu.py"]
    found = gpu_test_files()
    assert "tests/unit/test_phases.py" in found
    assert "tests/unit/test_gpu_check_logic.py" not in found


def test_step_plan_and_loss_verdict():
    assert plan_steps(3) == (1, 1, 1)
    assert plan_steps(20) == (2, 15, 3)
    with pytest.raises(ValueError, match="at least 3"):
        plan_steps(2)
    assert _loss_problem([5.0, 4.0, 3.5]) is None
    assert "non-finite" in (_loss_problem([5.0, float("nan")]) or "")
    assert "did not fall" in (_loss_problem([5.0, 5.1]) or "")


def test_the_tool_rejects_bad_arguments_in_one_line():
    proc = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--cpu", "--steps", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "error: --steps must be at least 3" in proc.stderr.splitlines()[-1]
