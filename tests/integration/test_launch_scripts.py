"""The launch scripts print the command they would run (DRY_RUN=1), under a fake SLURM too."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    full_env.update(DRY_RUN="1", **env)
    out = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env=full_env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return shlex.split(out)


def test_single_node():
    cmd = dry_run("torchrun.sh", "parallel.ep=2", "train.steps=3", NPROC_PER_NODE="4")
    assert cmd == [
        "torchrun",
        "--standalone",
        "--nproc-per-node",
        "4",
        "-m",
        "moetrain.train",
        "parallel.ep=2",
        "train.steps=3",
    ]


def test_multi_node_from_environment():
    cmd = dry_run(
        "torchrun.sh",
        "parallel.tp=2",
        NNODES="2",
        NODE_RANK="1",
        MASTER_ADDR="10.1.2.3",
        MASTER_PORT="29600",
        NPROC_PER_NODE="8",
        RUN_ID="job7",
    )
    assert cmd[: cmd.index("-m")] == [
        "torchrun",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--nproc-per-node",
        "8",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "10.1.2.3:29600",
        "--rdzv-id",
        "job7",
        "--rdzv-conf",
        "is_host=0",
    ]
    assert cmd[cmd.index("-m") :] == ["-m", "moetrain.train", "parallel.tp=2"]


def test_slurm_under_a_fake_allocation(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    scontrol = fake / "scontrol"
    # a long host list: a reader that stops after the first line would SIGPIPE scontrol
    scontrol.write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[3-4]" ] || exit 9\necho gpu3\n'
        "i=0; while [ $i -lt 20000 ]; do echo gpu4; i=$((i+1)); done\n"
    )
    scontrol.chmod(0o755)
    cmd = dry_run(
        "slurm.sbatch",
        "parallel.ep=8",
        PATH=f"{fake}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST="gpu[3-4]",
        SLURM_NNODES="2",
        SLURM_JOB_ID="99",
    )
    assert cmd[:6] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    assert {"NNODES=2", "MASTER_ADDR=gpu3", "RUN_ID=slurm-99"} <= set(cmd)
    assert cmd[-2:] == [str(LAUNCH / "torchrun.sh"), "parallel.ep=8"]
    # each node's task gets its rank from SLURM_NODEID
    assert any("NODE_RANK=$SLURM_NODEID" in part for part in cmd)


def test_slurm_outside_an_allocation_says_so():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch")], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "run under SLURM" in proc.stderr


def run_plan(*args: str) -> subprocess.CompletedProcess:
    tool = LAUNCH.parent / "tools" / "plan_parallel.py"
    return subprocess.run(
        ["python", str(tool), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_plan_parallel_dry_run():
    proc = run_plan("--world-size", "4", "parallel.tp=2", "parallel.ep=2")
    assert proc.returncode == 0, proc.stderr
    assert "dp_shard 2 x cp 1 x tp 2; experts: ep 2, etp 1, edp 2" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[0].isdigit()]
    assert [r[10] for r in rows] == ["0-3", "4-7", "0-3", "4-7"]  # experts by EP rank
    bad = run_plan("--world-size", "4", "parallel.ep=3")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("plan_parallel: error: parallel.ep: 3 does not divide")
    assert "memory per GPU in MB" in proc.stdout and "pp0    0-3 " in proc.stdout


def test_plan_parallel_memory_of_deepseek_v3_at_2048_ranks():
    import json

    proc = run_plan(
        "--world-size", "2048", "--json", "model=deepseek_v3", "parallel.pp=16",
        "parallel.ep=64", "parallel.activation_checkpointing=true", "train.dtype=bf16",
        "train.micro_batch_size=1", "train.seq_len=4096", "train.global_batch_size=4096",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)  # one JSON object, nothing else on stdout
    assert plan["world_size"] == 2048 and plan["all_parameters_on_meta"]
    assert [c["ranks"][0] for c in plan["per_rank"]] == list(range(0, 2048, 128))
    assert all(len(c["ranks"]) == 128 for c in plan["per_rank"])
    assert 10 < plan["max_rank_total_gb"] < 80 and plan["fits"]
    assert plan["peak_rss_mb"] < 2000  # shapes only: 671B parameters never allocated
    # the first stage holds the embedding (129280 x 7168, FSDP over 128 ranks) and 4 layers
    first = plan["per_rank"][0]
    assert first["activations"]["in_flight"] == [16]  # 1F1B: pp micro-batches on stage 0
    assert plan["per_rank"][-1]["activations"]["in_flight"] == [1]


def test_plan_parallel_over_budget_is_one_line():
    proc = run_plan("--world-size", "2", "parallel.ep=2", "--gpu-memory-gb", "0.001")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "memory per GPU" in proc.stdout  # the plan is printed before the error
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("plan_parallel: error: rank class pp0 needs ")
    assert "GB > 0.001 GB; largest: activations " in lines[0]
    assert "parallel.activation_checkpointing=true" in lines[0]
