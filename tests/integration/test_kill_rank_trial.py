"""One trial of ``tools/kill_rank_trial.py`` end to end: a 2-process torchrun launch that saves
every step loses a random rank to SIGKILL at a random moment (possibly mid-save), torchrun
restarts the workers, and the run ends with the uninterrupted launch's losses bit for bit.

(``test_torchrun.py`` kills a fixed rank right after a fixed checkpoint; this one goes through
the tool, so the tool's rank finding, kill and checks are tested too.)"""

from __future__ import annotations

import importlib
import random
import time
from pathlib import Path

import pytest

from moetrain.testing.layouts import write_token_dir

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_killed_rank_ends_with_the_uninterrupted_losses(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(TOOLS))
    tool = importlib.import_module("kill_rank_trial")
    data_dir = write_token_dir(str(tmp_path / "tokens"))
    ref = tool.reference(data_dir, tmp_path, steps=8, timeout=100)
    assert [step for step, _ in ref] == list(range(1, 9))
    seed = time.time_ns()
    rng = random.Random(seed)
    result = tool.trial(data_dir, tmp_path, 0, rng, ref, max_kills=1, window=1.0, timeout=120)
    why = f"seed {seed}: {result}"
    assert len(result["kills"]) == 1, why
    assert result["kills"][0]["latest_complete"], why
    assert result["restarts"] == 1 and result["resumes"] == 1, why
    assert result["exit_code"] == 0, why
    assert result["steps_once"] and result["exact"], why  # every step once, bit for bit
    assert result["final_latest"] == "00000008" and result["final_latest_complete"], why
    assert result["ok"], why
