"""``torchrun -m moetrain.train`` at parallel layouts logs the single-process losses, and a bad
layout is one clear line before any process group starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain.testing.distributed import free_port
from moetrain.testing.layouts import write_token_dir
from moetrain.train.cli import compose_config, setup


def common(data_dir: str) -> list[str]:
    return [
        "data.source=tokens",
        f"data.path={data_dir}",
        "train.steps=3",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.seq_len=64",
        "train.eval_batches=1",
        "train.log_interval=1",
        "train.peak_flops_per_device=1e12",
        "logging.wandb.mode=disabled",
        "logging.progress_bar=false",
    ]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "-m",
        "moetrain.train",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=280)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_token_dir(str(tmp_path_factory.mktemp("tokens")))


@pytest.fixture(scope="module")
def single_losses(data_dir, tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    _, _, trainer = setup(compose_config([*common(data_dir), f"run.dir={run_dir}"]))
    trainer.run()
    return losses(run_dir)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "layout",
    [["parallel.ep=2"], ["parallel.tp=2", "parallel.pp=2"], ["parallel.tp=2", "parallel.ep=2"]],
    ids=["ep2", "tp2_pp2", "tp2_ep2"],
)
def test_torchrun_4_processes_logs_single_process_losses(layout, data_dir, single_losses, tmp_path):
    run_dir = tmp_path / "run"
    proc = torchrun(4, [*common(data_dir), *layout, f"run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "layout: world 4" in proc.stdout
    got = losses(run_dir)
    assert len(got) == 3
    assert got == pytest.approx(single_losses, rel=1e-5)


@pytest.mark.timeout(300)
def test_torchrun_dp2_with_router_jitter_logs_single_process_losses(data_dir, tmp_path):
    """Router jitter at dp=2 (each rank its own micro-batches): the noise is keyed by each
    token's place in the global batch, so the run logs the single-process losses."""
    jitter = [*common(data_dir), "model.moe.router_jitter=0.1"]
    single_dir, dp2_dir = tmp_path / "single", tmp_path / "dp2"
    _, _, trainer = setup(compose_config([*jitter, f"run.dir={single_dir}"]))
    trainer.run()
    proc = torchrun(2, [*jitter, f"run.dir={dp2_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want = losses(single_dir)
    assert len(want) == 3
    assert losses(dp2_dir) == pytest.approx(want, rel=1e-5)


@pytest.mark.timeout(120)
def test_bad_layout_under_torchrun_is_one_line(data_dir, tmp_path):
    proc = torchrun(2, [*common(data_dir), "parallel.ep=3"], cwd=tmp_path)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("moetrain-train: error")]
    assert ours == [
        "moetrain-train: error: parallel.ep: 3 does not divide dp_shard x cp x tp = 2 (the ranks "
        "of one pipeline stage that experts spread over when etp=1); pick a divisor of 2"
    ]
    assert "process group" not in proc.stderr.lower()


@pytest.mark.parametrize(
    "world,overrides,fragment",
    [
        (4, ["parallel.ep=3"], "parallel.ep: 3 does not divide"),
        (2, ["parallel.ep=4"], "parallel.ep: 4 does not divide dp_shard x cp x tp = 2"),
        (4, ["parallel.dp_shard=2"], "the world size is 4"),
        (3, ["parallel.tp=2"], "world size 3 is not divisible"),
        (
            2,
            [
                "parallel.pp=2",
                "parallel.pp_virtual_stages=3",
                "parallel.pp_schedule=interleaved_1f1b",
            ],
            "parallel.pp: pp x virtual stages = 2 x 3 = 6 exceeds model.num_layers=4",
        ),
        (
            4,
            ["parallel.tp=4", "model.num_kv_heads=2"],
            "parallel.tp: 4 does not divide model.num_kv_heads",
        ),
        (
            2,
            ["parallel.pp=2", "train.global_batch_size=2"],
            "1f1b needs at least pp=2 micro-batches",
        ),
        (2, ["parallel.pp=2", "parallel.pp_schedule=zb"], "parallel.pp_schedule: must be one of"),
    ],
    ids=[
        "ep_not_dividing_experts_ranks",
        "ep_above_ranks",
        "world_not_product",
        "world_not_divisible",
        "stages_above_layers",
        "tp_not_dividing_heads",
        "too_few_micro_batches",
        "unknown_schedule",
    ],
)
def test_bad_layouts_fail_in_validation(
    world, overrides, fragment, data_dir, monkeypatch, tmp_path
):
    """Validation reads the world size from the launcher's environment and fails before any
    process group exists."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ValueError) as err:
        setup(compose_config([*common(data_dir), f"run.dir={tmp_path}", *overrides]))
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)
    assert not dist.is_initialized()


def test_ep_not_dividing_experts(data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError) as err:
        setup(compose_config([*common(data_dir), f"run.dir={tmp_path}", "parallel.ep=6"]))
    assert str(err.value) == "parallel.ep: 6 does not divide model.moe.num_experts=8"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_rank_restarts_and_resumes_with_the_same_losses(data_dir, tmp_path):
    """torchrun --max-restarts: a worker killed mid-run makes the agent restart every worker;
    they resume from the newest complete checkpoint and the run logs the uninterrupted losses."""
    import signal
    import time

    args = [*common(data_dir), "train.steps=12", "checkpoint.interval=3", "parallel.ep=2"]
    ref_dir = tmp_path / "ref"
    ref = torchrun(2, [*args, f"run.dir={ref_dir}"], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
        "--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "-m", "moetrain.train", *args, f"run.dir={run_dir}",
    ]  # fmt: skip
    out_file, err_file = (tmp_path / "out.txt").open("w"), (tmp_path / "err.txt").open("w")
    # files, not pipes: an unread pipe that fills up would block the agent
    agent = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=out_file, stderr=err_file)
    deadline = time.monotonic() + 200
    while not (run_dir / "checkpoints" / "00000006").exists():
        assert agent.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    workers = subprocess.run(
        ["pgrep", "-P", str(agent.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    agent.wait(timeout=300)
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert agent.returncode == 0, err[-3000:]
    assert "resumed from" in out
    assert losses(run_dir) == losses(ref_dir)
    assert len(losses(run_dir)) == 12
