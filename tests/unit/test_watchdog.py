"""The activity record, the step watchdog in one process (its exit replaced), and the straggler
fields' reduction math."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from moetrain.parallel import activity
from moetrain.train.callbacks import straggler_fields
from moetrain.train.watchdog import (
    ALARM_FILE,
    HANG_EXIT_CODE,
    SUMMARY_FILE,
    Watchdog,
    parse_report,
    report_path,
    summary_line,
)


@pytest.fixture(autouse=True)
def _fresh_record():
    activity.reset()
    yield
    activity.reset()


def test_activity_records_phase_and_collective_and_accumulates_the_wait():
    activity.set_phase("forward micro-batch 0")
    assert activity.current().describe() == "in forward micro-batch 0 (not in a collective)"
    with activity.collective("all_to_all", "ep dispatch", "ep group ranks [0, 1]"):
        seen = activity.current()
        with activity.collective("all_gather", "inner", "x"):  # nested: outer record, once
            assert activity.current() is seen
            time.sleep(0.05)
    assert seen.describe() == (
        "waiting in all_to_all (ep dispatch) on ep group ranks [0, 1], during forward micro-batch 0"
    )
    assert activity.current().collective is None
    assert activity.current().phase == "forward micro-batch 0"
    wait = activity.take_comm_wait_s()
    assert 0.05 <= wait < 1.0
    assert activity.take_comm_wait_s() == 0.0  # drained


def test_activity_is_readable_from_another_thread_and_a_failed_wait_is_still_closed():
    activity.set_phase("backward micro-batch 1")
    seen: list[activity.Snapshot] = []
    with pytest.raises(RuntimeError), activity.collective("all_to_all", "ep combine grad", "g"):
        reader = threading.Thread(target=lambda: seen.append(activity.current()))
        reader.start()
        reader.join()
        raise RuntimeError("peer gone")
    assert seen[0].collective == ("all_to_all", "ep combine grad", "g")
    assert activity.current().collective is None


def test_group_label_outside_a_process_group_and_compact_rank_lists(monkeypatch):
    # an earlier test in this process may have left a default group up: pretend there is none
    monkeypatch.setattr(activity.dist, "is_initialized", lambda: False)
    assert activity.group_label(None, "label test") == "label test group"
    assert activity._compact([0, 1]) == "[0, 1]"
    assert activity._compact(list(range(0, 64, 2))) == "[0..62 step 2] (32 ranks)"
    assert activity._compact(list(range(16))) == "[0..15] (16 ranks)"


def test_straggler_fields_from_the_rank_table():
    table = torch.tensor([[1.0, 0.5], [1.4, 0.0], [1.2, 0.5]], dtype=torch.float64)
    assert straggler_fields(table) == {
        "straggler/step_s_min": 1.0,
        "straggler/step_s_max": pytest.approx(1.4),
        "straggler/step_s_argmax": 1,
        "straggler/a2a_wait_s_min": 0.0,
        "straggler/a2a_wait_s_max": 0.5,
        "straggler/a2a_wait_s_argmax": 0,  # ties: the lowest rank
        "straggler/a2a_wait_s_argmin": 1,  # the rank the others waited for
    }


def test_summary_line_groups_ranks_culprits_first_and_names_the_silent(tmp_path):
    waiting = "waiting in all_to_all (ep dispatch) on ep group ranks [0..3], during forward"
    reports: dict[int, dict[str, Any]] = {
        0: {"step": 3, "activity": waiting},
        1: {"step": 3, "activity": "in forward micro-batch 0 (not in a collective)"},
        2: {"step": 3, "activity": waiting},
        4: {"step": None, "activity": "in checkpoint save (not in a collective)"},
    }
    line = summary_line(3, 10.0, 6, reports, tmp_path)
    assert line == (
        "moetrain: step 3 exceeded parallel.timeout_s=10 s: rank 1 in forward micro-batch 0 "
        "(not in a collective); rank 4 (between steps) in checkpoint save (not in a "
        f"collective); ranks 0,2 {waiting}; ranks 3,5 sent no report (gone, or stuck holding "
        f"the GIL); diagnosis in {tmp_path}/hang-rank*.txt"
    )


def _fire_in_this_process(tmp_path: Path, world: int, **kw) -> tuple[Watchdog, list[int], str]:
    codes: list[int] = []
    out = io.StringIO()
    dog = Watchdog(tmp_path, 0, world, timeout_s=0.3, exit_fn=codes.append, stream=out, **kw)
    dog.start()
    dog.step_begin(7)
    activity.set_phase("optimizer")
    deadline = time.monotonic() + 10
    while not codes and time.monotonic() < deadline:
        time.sleep(0.05)  # this frame shows in the report's stacks
    dog.stop()
    return dog, codes, out.getvalue()


def test_watchdog_reports_summarizes_and_exits(tmp_path):
    start = time.monotonic()
    dog, codes, out = _fire_in_this_process(tmp_path, 1)
    assert codes == [HANG_EXIT_CODE] and dog.fired
    assert time.monotonic() - start < 3
    assert out == (
        "moetrain: step 7 exceeded parallel.timeout_s=0.3 s: rank 0 in optimizer (not in a "
        f"collective); diagnosis in {tmp_path}/hang-rank*.txt\n"
    )
    text = report_path(tmp_path, 0).read_text()
    assert parse_report(text)["step"] == 7  # type: ignore[index]
    assert "activity: in optimizer (not in a collective)" in text
    assert "_fire_in_this_process" in text  # the main thread's stack
    assert "moetrain-watchdog" in text or "_loop" in text  # the watchdog thread's own
    assert (tmp_path / SUMMARY_FILE).read_text() == out
    assert json.loads((tmp_path / ALARM_FILE).read_text()) == {"rank": 0, "step": 7}


def test_rank0_waits_the_grace_period_for_a_missing_rank_and_ignores_stale_files(tmp_path):
    stale = report_path(tmp_path, 1)
    stale.write_text('summary: {"rank": 1, "step": 7, "activity": "in stale"}\n')
    old = time.time() - 3600
    os.utime(stale, (old, old))
    start = time.monotonic()
    _, codes, out = _fire_in_this_process(tmp_path, 2, grace_s=0.5)
    assert codes == [HANG_EXIT_CODE]
    assert 0.5 <= time.monotonic() - start < 5
    assert "rank 1 sent no report" in out and "stale" not in out


def test_a_rank_outside_any_step_reports_when_another_raised_the_alarm(tmp_path):
    codes: list[int] = []
    out = io.StringIO()
    dog = Watchdog(tmp_path, 1, 2, timeout_s=5, grace_s=0.2, exit_fn=codes.append, stream=out)
    dog.start()  # never armed
    activity.set_phase("checkpoint save")
    (tmp_path / ALARM_FILE).write_text(json.dumps({"rank": 0, "step": 4}))
    deadline = time.monotonic() + 10
    while not codes and time.monotonic() < deadline:
        time.sleep(0.05)
    dog.stop()
    assert codes == [HANG_EXIT_CODE]
    report = parse_report(report_path(tmp_path, 1).read_text())
    assert report is not None
    assert report["step"] is None
    assert report["activity"] == "in checkpoint save (not in a collective)"
    assert "rank 0 gave no summary" in out.getvalue()  # no rank 0 here: it speaks for itself


def test_a_disarmed_watchdog_does_not_fire(tmp_path):
    codes: list[int] = []
    dog = Watchdog(tmp_path, 0, 1, timeout_s=0.2, exit_fn=codes.append)
    dog.start()
    dog.step_begin(1)
    dog.step_end()
    time.sleep(0.5)
    dog.stop()
    assert codes == [] and not dog.fired
    with pytest.raises(ValueError, match=r"parallel\.timeout_s"):
        Watchdog(tmp_path, 0, 1, timeout_s=0)
