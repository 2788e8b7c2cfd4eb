"""Run a benchmark worker module on the simulated cluster (``launch/sim_cluster.sh``) and read
back rank 0's JSON result: shared by the benchmarks that need several "nodes"."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SIM_CLUSTER = Path(__file__).resolve().parents[2] / "launch" / "sim_cluster.sh"


def cluster_problem(tool: str) -> str | None:
    """Why the simulated cluster cannot run here (None: it can), one line; ``tool`` names the
    caller (``tools/<tool>.py``)."""
    if os.geteuid() != 0:
        return (
            f"{tool}: needs root to create the simulated cluster's network namespaces; run it "
            f"with sudo (e.g. sudo .venv/bin/python tools/{tool}.py)"
        )
    for exe in ("ip", "tc"):
        if shutil.which(exe) is None:
            return f"{tool}: needs '{exe}' (iproute2) for the simulated cluster; install it"
    if not SIM_CLUSTER.exists():
        return f"{tool}: {SIM_CLUSTER} not found (run from a source checkout)"
    return None


def run_on_sim_cluster(
    module: str,
    args: Sequence[str],
    *,
    prefix: str,
    rate: str = "",
    subnet: str = "10.77.0",
    timeout: float = 3600,
) -> dict[str, Any]:
    """``python -m module --out PATH *args`` on 2 simulated nodes x 2 processes (one thread
    each; each node's link shaped to ``rate`` with tc tbf, "" = unlimited); rank 0 writes its
    JSON result to ``--out``, which is returned. ``prefix`` names the namespaces (at most 10
    characters, so interface names stay under 15). The workers' output goes to stderr."""
    from moetrain.testing.distributed import free_port

    with tempfile.TemporaryDirectory(prefix=f"{module.rsplit('.', 1)[-1]}-") as tmp:
        out = Path(tmp) / "result.json"
        env = {
            **os.environ,
            "NODES": "2",
            "NPROC_PER_NODE": "2",
            "RATE": rate,
            "DELAY": "",
            "MODULE": module,
            "OMP_NUM_THREADS": "1",
            "MASTER_PORT": str(free_port()),
            "PREFIX": prefix,
            "SUBNET": subnet,
            # sudo resets PATH: torchrun must be this interpreter's
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        cmd = ["bash", str(SIM_CLUSTER), "--out", str(out), *args]
        proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr)
        try:
            code = proc.wait(timeout=timeout)
        except BaseException:  # timeout or Ctrl-C: SIGTERM lets the script delete its namespaces
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            raise
        if code != 0 or not out.exists():
            raise RuntimeError(f"launch/sim_cluster.sh (RATE={rate!r}) exited {code}; see above")
        result: dict[str, Any] = json.loads(out.read_text())
        return result
