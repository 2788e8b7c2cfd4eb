"""The simulated 2-node cluster (network namespaces joined by veth pairs): its dry run, and, where
root and namespaces are available, a 20-step run whose first losses equal the single-process
run's."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from moetrain.testing.distributed import free_port
from moetrain.testing.layouts import write_token_dir
from moetrain.train.cli import compose_config, setup

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "sim_cluster.sh"


def namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = subprocess.run(["ip", "netns", "add", "mtprobe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "mtprobe"], check=False)
    return None


def test_dry_run_prints_the_topology_and_one_torchrun_per_node():
    env = {**os.environ, "DRY_RUN": "1", "NODES": "2", "NPROC_PER_NODE": "2", "RATE": "1gbit"}
    out = subprocess.run(
        ["bash", str(SCRIPT), "parallel.ep=2"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    cmds = [shlex.split(line) for line in out]
    assert ["ip", "netns", "add", "mtsim-sw"] in cmds
    assert ["ip", "netns", "add", "mtsim-n1"] in cmds
    tc = [c for c in cmds if "tc" in c]
    assert len(tc) == 2  # a token bucket per node link (netem only with DELAY)
    for c in tc:
        tbf = c[c.index("tbf") :]
        assert c[c.index("tc") :][:6] == ["tc", "qdisc", "add", "dev", "eth0", "root"]
        assert tbf[1:3] == ["rate", "1gbit"]
    launches = [c for c in cmds if c[-1] == "parallel.ep=2"]
    assert len(launches) == 2
    for rank, cmd in enumerate(launches):
        assert cmd[:4] == ["ip", "netns", "exec", f"mtsim-n{rank}"]
        assert f"NODE_RANK={rank}" in cmd and "MASTER_ADDR=10.77.0.1" in cmd
        assert f"LOCAL_ADDR=10.77.0.{rank + 1}" in cmd and "GLOO_SOCKET_IFNAME=eth0" in cmd


COMMON = [
    "data.source=tokens",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.seq_len=64",
    "train.eval_batches=1",
    "train.eval_interval=0",
    "train.log_interval=1",
    "train.peak_flops_per_device=1e12",
    "logging.wandb.mode=disabled",
    "logging.progress_bar=false",
]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_simulated_nodes_train_20_steps(tmp_path):
    why = namespaces_unavailable()
    if why:
        pytest.skip(why)
    data = write_token_dir(str(tmp_path / "tokens"))
    overrides = [*COMMON, f"data.path={data}", "parallel.ep=2"]
    run_dir = tmp_path / "sim"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NODES": "2", "NPROC_PER_NODE": "2"}
    env.update(MASTER_PORT=str(free_port()), PREFIX=f"mt{os.getpid() % 10000}")
    proc = subprocess.run(
        ["bash", str(SCRIPT), *overrides, "train.steps=20", f"run.dir={run_dir}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert env["PREFIX"] not in listed, "namespaces left behind"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 20
    single_dir = tmp_path / "single"
    single = [*COMMON, f"data.path={data}", "train.steps=3", f"run.dir={single_dir}"]
    _, _, trainer = setup(compose_config(single))
    result = trainer.run()
    # the first 3 steps of a 20-step run vs a 3-step run: same lr while warming up (30 steps)
    assert losses[:3] == pytest.approx(result.losses, rel=1e-5)
