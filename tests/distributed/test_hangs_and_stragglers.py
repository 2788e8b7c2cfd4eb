"""Run safety at world 2: a rank that hangs inside a step ends the launch within
``parallel.timeout_s`` plus a margin, with per-rank diagnosis files and rank 0's one line; the
straggler fields name the slow rank."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moetrain.parallel import activity
from moetrain.parallel.context import init_parallel
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.ep_comm import FlatAllToAll, Splits
from moetrain.testing.distributed import free_port, run_distributed
from moetrain.testing.layouts import write_token_dir
from moetrain.train.callbacks import StragglerStatistics
from moetrain.train.watchdog import HANG_EXIT_CODE, SUMMARY_FILE, parse_report, report_path

WORKER = Path(__file__).with_name("hang_worker.py")
TIMEOUT_S = 4.0
# start-up of two processes on a loaded 2-core machine, the watchdog's poll and rank 0's grace
MARGIN_S = 60.0


def torchrun_worker(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--max-restarts=0",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        str(WORKER),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    return proc, time.monotonic() - start


def check_hang_diagnosis(proc: subprocess.CompletedProcess, run_dir: Path, rank0: str) -> None:
    """Both ranks exited with the watchdog's code, each wrote its report with stacks, and rank
    0 printed one line naming rank 1 (asleep in its forward) and what rank 0 waited in."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "finished without a hang" not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if "exceeded parallel.timeout_s" in ln]
    assert len(lines) == 1, proc.stderr[-4000:]
    line = lines[0]
    assert f"step 2 exceeded parallel.timeout_s={TIMEOUT_S:g} s: rank 1 in forward" in line
    assert f"rank 0 {rank0}" in line
    assert line.endswith(f"diagnosis in {run_dir}/hang-rank*.txt")
    assert (run_dir / SUMMARY_FILE).read_text().strip() in line
    assert f"exitcode:{HANG_EXIT_CODE}" in proc.stderr.replace(" ", ""), proc.stderr[-4000:]
    for rank in (0, 1):
        text = report_path(run_dir, rank).read_text()
        report = parse_report(text)
        assert report is not None and report["step"] == 2
        assert "Python stack of every thread" in text
    assert "hang_worker.py" in report_path(run_dir, 1).read_text()  # where it slept


@pytest.mark.timeout(300)
def test_a_rank_sleeping_in_a_step_ends_the_launch_with_a_diagnosis(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc, seconds = torchrun_worker(["api", str(run_dir), f"{TIMEOUT_S:g}"], tmp_path)
    check_hang_diagnosis(
        proc,
        run_dir,
        "waiting in all_to_all (ep counts) on ep group ranks [0, 1], during forward micro-batch 0",
    )
    # the watchdog, not the process group's timeout (TIMEOUT_S + 60 s), ended it
    assert seconds < TIMEOUT_S + MARGIN_S


@pytest.mark.timeout(300)
def test_the_trainer_ends_a_hung_step_with_a_diagnosis(tmp_path):
    data_dir = write_token_dir(str(tmp_path / "tokens"))
    run_dir = tmp_path / "run"
    args = ["trainer", str(run_dir), f"{TIMEOUT_S:g}", data_dir]
    proc, seconds = torchrun_worker(args, tmp_path)
    check_hang_diagnosis(proc, run_dir, "waiting in all_to_all (ep counts) on ep group ranks")
    assert seconds < TIMEOUT_S + MARGIN_S + 30  # + the trainer's set-up


def _slow_rank_steps(rank: int, world: int, slow: int, delay_s: float) -> list[dict]:
    """Two fake steps of an exchange; rank ``slow`` sleeps before it (the others wait in it)
    and after it (its step is the longest)."""
    ctx = init_parallel(ParallelDims(world_size=world))
    activity.reset()
    comm = FlatAllToAll(None)
    callback = StragglerStatistics()
    trainer = SimpleNamespace(ctx=ctx)
    rows = []
    for step in (1, 2):
        callback.pre_step(trainer, step)  # type: ignore[arg-type]
        if rank == slow:
            time.sleep(delay_s)
        recv = comm.exchange_counts(torch.ones(world, 1, dtype=torch.long)).recv_Pe
        comm.start(torch.ones(world, 3), Splits([1] * world, recv.sum(1).tolist())).wait()
        if rank == slow:
            time.sleep(delay_s)
        rows.append(callback.log_fields(trainer))  # type: ignore[arg-type]
    return rows


@pytest.mark.timeout(120)
def test_straggler_fields_name_the_slow_rank():
    delay = 0.3
    by_rank = run_distributed(_slow_rank_steps, 2, 1, delay)
    assert by_rank[0] == by_rank[1]  # every rank computes the same fields
    for row in by_rank[0]:
        assert row["straggler/step_s_argmax"] == 1
        assert row["straggler/step_s_max"] >= 2 * delay
        assert row["straggler/a2a_wait_s_argmax"] == 0  # rank 0 waited for rank 1
        assert row["straggler/a2a_wait_s_argmin"] == 1
        assert row["straggler/a2a_wait_s_max"] >= 0.8 * delay
        assert row["straggler/a2a_wait_s_min"] < 0.5 * delay
