"""tools/plan_parallel.py and tools/compare_dense.py from the command line: whole help texts,
and parallel.pp_virtual_stages planned as the config key it is (``--virtual-stages``: a
deprecated alias that may not disagree with the key)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
INTERLEAVED = ["--world-size", "2", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"]


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOLS / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"},
    )


def description(help_text: str) -> str:
    """The help's text between the usage and the argument list, on one line."""
    body = help_text.split("\n\n", 1)[1].split("\npositional arguments:", 1)[0]
    return " ".join(body.split())


def test_help_texts_are_whole_sentences():
    plan = tool("plan_parallel.py", "--help")
    assert plan.returncode == 0, plan.stderr
    text = description(plan.stdout)
    assert "what each rank holds and its memory per GPU." in text
    assert "(exit status 3)." in text and "parallel.pp_virtual_stages=N" in text
    compare = tool("compare_dense.py", "--help")
    assert compare.returncode == 0, compare.stderr
    text = description(compare.stdout)
    assert "on the same tokens and report both validation losses." in text
    assert "same steps and tokens." in text
    options = " ".join(compare.stdout.split("options:", 1)[1].split())
    assert "--steps STEPS training steps of each run" in options  # no option without its help
    assert "--json print one JSON list of both rows" in options


def plan_json(*args: str) -> tuple[dict, subprocess.CompletedProcess]:
    proc = tool("plan_parallel.py", "--json", *INTERLEAVED, *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc


def test_virtual_stages_config_key_and_deprecated_flag():
    by_key, proc = plan_json("parallel.pp_virtual_stages=2")
    assert by_key["settings"]["pp_virtual_stages"] == 2 and proc.stderr == ""
    by_flag, proc = plan_json("--virtual-stages", "2")
    assert "--virtual-stages is deprecated; use parallel.pp_virtual_stages=2" in proc.stderr
    assert by_flag["per_rank"] == by_key["per_rank"]
    both, _ = plan_json("--virtual-stages", "2", "parallel.pp_virtual_stages=2")
    assert both["per_rank"] == by_key["per_rank"]
    bad = tool(
        "plan_parallel.py", *INTERLEAVED, "parallel.pp_virtual_stages=2", "--virtual-stages", "4"
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "plan_parallel: error: --virtual-stages 4 disagrees with parallel.pp_virtual_stages=2; "
        "give only parallel.pp_virtual_stages=N (--virtual-stages is its deprecated alias)"
    ]
