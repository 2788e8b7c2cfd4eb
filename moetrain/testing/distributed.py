"""``run_distributed``: run a function on N gloo processes, the one helper every multi-process
test uses. A hang fails fast: the processes are killed at ``timeout`` seconds.

Workers are forked from a fork server that imported torch and moetrain's trainer once
(``multiprocessing``'s ``forkserver``, started at the first launch; it never runs a torch op,
so no thread pool is forked): a launch does not pay each process's ~5 s of imports. Each worker
takes the launching process's environment as it is at the launch and one intra-op thread
(``torch.set_num_threads(1)``). Variables torch or moetrain may read when imported
(``TORCH*``, ``PYTORCH*``, ``MOETRAIN_*``) keep the fork server's values, so a launch whose
values of them differ from the fork server's spawns fresh processes instead.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# imported once in the fork server (an ImportError there is ignored: the worker imports again)
PRELOAD = ["torch", "torch.distributed", "moetrain.train.trainer", "moetrain.testing.layouts"]
IMPORT_TIME_ENV = ("TORCH", "PYTORCH", "MOETRAIN_")  # prefixes: the fork server's must match
_server_env: dict[str, str] | None = None


def _context() -> Any:
    """The fork server's context, or spawn when an import-time variable changed since it
    started (the fork server is this module's: started by its first launch)."""
    global _server_env
    env = {k: v for k, v in os.environ.items() if k.startswith(IMPORT_TIME_ENV)}
    if _server_env is None:
        _server_env = env
        mp.set_forkserver_preload(PRELOAD)
    return mp.get_context("forkserver" if env == _server_env else "spawn")


def _worker(
    rank: int,
    world_size: int,
    port: int,
    timeout: float,
    backend: str,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
    env: dict[str, str],
) -> None:
    os.environ.clear()  # the launching process's environment, not the fork server's
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)  # the fork server's OpenMP read its OMP_NUM_THREADS at import
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout)
        )
        # pickled by value: tensors put on a multiprocessing queue would travel as shared-memory
        # handles that die with this process
        results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # report everything, including assertion failures, to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes, each with a
    default process group (gloo; ``backend="nccl"`` puts rank r on GPU r), and return the ranks'
    return values in rank order.

    ``fn`` and its arguments must be picklable (a module-level function). Raises
    ``RuntimeError`` with the failing ranks' tracebacks, or ``TimeoutError`` after ``timeout``
    seconds (every process is then killed).
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, timeout, backend, fn, args, results, env),
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout)
            outcomes[rank] = (status, value)
    except queue.Empty as err:  # some rank neither returned nor failed in time
        missing = sorted(set(range(world_size)) - set(outcomes))
        raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s") from err
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    errors = {r: v for r, (s, v) in outcomes.items() if s == "error"}
    if errors:
        raise RuntimeError("\n".join(f"--- rank {r}:\n{tb}" for r, tb in sorted(errors.items())))
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
