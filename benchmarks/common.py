"""What the benchmarks share: the layer shape of the multi-process benchmarks and its options,
round-robin timing over ranks, reductions over ranks, the peer table's lines, and running a
worker module on the simulated cluster (``launch/sim_cluster.sh``) to read back its result.

Legend: E experts (all ranks together), K top-k, D model dim, F expert hidden dim, T tokens per
rank.

``benchmarks`` lives in the repository, not in the installed package: ``tools/bench_*.py`` put
the repository root on ``sys.path``, and ``run_on_sim_cluster`` hands it to the workers through
``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from moetrain.moe import MoEConfig
from moetrain.torch_compat import all_gather_single

ROOT = Path(__file__).resolve().parents[1]  # the repository: benchmarks/ and launch/
SIM_CLUSTER = ROOT / "launch" / "sim_cluster.sh"

K = TypeVar("K", bound=Hashable)


# --- the layer shape and its command-line options ---------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer (fp32, SwiGLU, dropless) run on every rank with its own ``tokens``.
    Benchmarks subclass it to change the defaults."""

    num_experts: int = 8
    top_k: int = 2
    dim: int = 256
    hidden_dim: int = 1024
    tokens: int = 8192  # per rank

    def moe_config(self, **overrides: Any) -> MoEConfig:
        """The layer's ``MoEConfig``; ``overrides`` set its other fields."""
        return MoEConfig(
            num_experts=self.num_experts,
            top_k=self.top_k,
            dim=self.dim,
            hidden_dim=self.hidden_dim,
            **overrides,
        )


S = TypeVar("S", bound=LayerShape)


def describe_shape(shape: Mapping[str, Any]) -> str:
    """``E=8 K=2 D=256 F=1024 T=8192/rank`` from a shape as results store it (``asdict``)."""
    return (
        f"E={shape['num_experts']} K={shape['top_k']} D={shape['dim']} "
        f"F={shape['hidden_dim']} T={shape['tokens']}/rank"
    )


def add_shape_options(parser: argparse.ArgumentParser, default: LayerShape, repeats: int) -> None:
    """``--experts --top-k --dim --hidden --tokens`` (defaults from ``default``) and
    ``--repeats`` (default ``repeats``); ``shape_from`` reads the shape back."""
    parser.add_argument("--experts", type=int, default=default.num_experts, help="E (global)")
    parser.add_argument("--top-k", type=int, default=default.top_k, help="K")
    parser.add_argument("--dim", type=int, default=default.dim, help="D")
    parser.add_argument("--hidden", type=int, default=default.hidden_dim, help="F (per expert)")
    parser.add_argument("--tokens", type=int, default=default.tokens, help="T per rank")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats (median)")


def shape_from(args: argparse.Namespace, cls: type[S]) -> S:
    """The shape that ``add_shape_options``' options describe, as a ``cls``."""
    return cls(args.experts, args.top_k, args.dim, args.hidden, args.tokens)


def shape_args(shape: LayerShape, repeats: int) -> list[str]:
    """The command line that ``add_shape_options`` parses back into ``shape`` and ``repeats``:
    what a driver forwards to its workers."""
    return [
        *("--experts", str(shape.num_experts), "--top-k", str(shape.top_k)),
        *("--dim", str(shape.dim), "--hidden", str(shape.hidden_dim)),
        *("--tokens", str(shape.tokens), "--repeats", str(repeats)),
    ]


# --- timing and reductions over ranks (collective: every rank calls them alike) ---------------


def time_round_robin(
    steps: Mapping[K, Callable[[], None]], repeats: int, warmup: bool = False
) -> dict[K, list[float]]:
    """This rank's time (seconds) of every step in each of ``repeats`` rounds. The steps take
    turns within a round, so a burst of load from elsewhere hits them alike, and a barrier lines
    the ranks up before every timed call. ``warmup``: one untimed call of each step first.
    Every rank must pass the same keys in the same order."""
    if warmup:
        for fn in steps.values():
            fn()
    times: dict[K, list[float]] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, fn in steps.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def slowest_rank(times: Mapping[K, list[float]]) -> dict[K, list[float]]:
    """Per step and round, the maximum over ranks of ``time_round_robin``'s times."""
    return dict(zip(times, reduce_over_ranks(list(times.values()), "max")))


def reduce_over_ranks(
    values: Sequence[Any], op: str = "sum", dtype: torch.dtype = torch.float64
) -> Any:
    """``values`` (numbers, or equal-length lists of them) summed (``op="sum"``) or maximized
    (``"max"``) over ranks, elementwise, in ``dtype``; returned as Python numbers
    (``tolist``): ints for an integer ``dtype``."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    t = torch.tensor(values, dtype=dtype)
    dist.all_reduce(t, op=ops[op])
    return t.tolist()


def gather_ranks(value: float) -> list[float]:
    """Every rank's ``value``, in rank order."""
    t = torch.tensor([value], dtype=torch.float64)
    out = t.new_empty(dist.get_world_size())
    all_gather_single(out, t)
    return out.tolist()


# --- the peer table (tools/bench_moe_layer.py) ------------------------------------------------


def peer_lines(rows: Sequence[Mapping[str, Any]], peer_width: int, cells: Callable) -> list[str]:
    """One table line per result row: case, mode and peer, then ``cells(row)`` and the row's
    speed relative to the ``moetrain`` peer's at the same case and mode ("vs ours"); a row
    without a time (``seconds`` None) shows its note instead."""
    ours = {(r["case"], r["mode"]): r["seconds"] for r in rows if r["peer"] == "moetrain"}
    lines = []
    for r in rows:
        head = f"{r['case']:8} {r['mode']:9} {r['peer']:{peer_width}}"
        if r["seconds"] is None:
            lines.append(f"{head} {r['note']}")
            continue
        base = ours.get((r["case"], r["mode"]))
        speed = f"{base / r['seconds']:.2f}x" if base else ""
        lines.append(f"{head} {cells(r)} {speed:>8}")
    return lines


# --- the simulated cluster --------------------------------------------------------------------


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
    JSON result to ``--out``, which is returned. ``module`` is imported with the repository root
    on ``PYTHONPATH`` (``benchmarks.<name>_worker``). ``prefix`` names the namespaces (at most 10
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
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
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
