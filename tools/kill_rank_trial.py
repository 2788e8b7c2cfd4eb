"""Kill-a-rank trial under torchrun: SIGKILL random workers of a 2-process run that checkpoints
every step, let torchrun restart them, and check that the run ends with the uninterrupted losses.

    python tools/kill_rank_trial.py --trials 10 [--steps 20] [--max-kills 3] [--json]

First one uninterrupted launch (``torchrun --standalone --nproc-per-node 2 -m moetrain.train``,
tiny model, ``parallel.ep=2``, fixed seed, a checkpoint after every step) gives the reference
losses. Each trial then draws k in 1..``--max-kills`` and starts the same launch in a fresh run
dir with ``--max-restarts k``. k times: once the current workers (torchrun's child processes,
told apart by the ``RANK`` and ``TORCHELASTIC_RESTART_COUNT`` in their environment) have
written a checkpoint of their own, it sleeps a random 0..``--window`` s and SIGKILLs the worker
of a random rank; right after, it records whether a save was in flight (a ``.tmp-*`` directory)
and whether ``latest`` names a complete checkpoint. torchrun stops the other worker and starts
new ones, which resume from the newest complete checkpoint. A trial passes when the launch
exits 0, ``metrics.jsonl`` holds every step's loss once, equal to the reference's (rtol 1e-5;
``exact`` says whether bit for bit) and ``latest`` names the last step's complete checkpoint.
Exit status 1 if any trial fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kill_during_save_trial import checkpoint_state, command

from moetrain.testing.layouts import write_token_dir

NPROC = 2


def launch_command(data_dir: str, run_dir: Path, steps: int, max_restarts: int) -> list[str]:
    """``torchrun --standalone`` (as ``python -m torch.distributed.run``) of ``NPROC`` workers
    training ``steps`` steps at ``parallel.ep=NPROC``, seed 0, a checkpoint after every step."""
    train = command(data_dir, run_dir, steps, f"parallel.ep={NPROC}", "train.seed=0")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={NPROC}",
        f"--max-restarts={max_restarts}",
        *train[1:],  # "-m moetrain.train <overrides>"
    ]


def launch_env() -> dict[str, str]:
    """The environment for a launch: this interpreter's bin directory first on PATH, one OpenMP
    thread per worker, wandb quiet."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (read from ``/proc/*/stat``)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def workers(agent_pid: int) -> dict[int, tuple[int, int]]:
    """torchrun's workers now: rank -> (pid, restart count), from each child's environment (a
    child that has not yet exec'd the worker carries no ``RANK`` and is left out)."""
    out = {}
    for pid in children(agent_pid):
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        env = dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)
        if b"RANK" in env and b"TORCHELASTIC_RESTART_COUNT" in env:
            out[int(env[b"RANK"])] = (pid, int(env[b"TORCHELASTIC_RESTART_COUNT"]))
    return out


def newest_step(ckpts: Path) -> int:
    """The highest step with a renamed (complete) checkpoint directory; 0 if none."""
    try:
        return max((int(p.name) for p in ckpts.iterdir() if p.name.isdigit()), default=0)
    except OSError:
        return 0


class Launch:
    """One torchrun launch, its output in ``log``; ``restarts`` is the highest restart count seen
    among its workers so far. Every wait raises TimeoutError past ``timeout`` s from the start."""

    def __init__(self, cmd: list[str], run_dir: Path, log: Path, timeout: float) -> None:
        self.ckpts = run_dir / "checkpoints"
        self.log = log
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        self.restarts = 0
        with log.open("w") as out:  # a file, not a pipe: an unread pipe would block the agent
            self.agent = subprocess.Popen(cmd, env=launch_env(), stdout=out, stderr=out)

    def __enter__(self) -> Launch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """End the launch if it still runs: SIGTERM (torchrun then stops its workers), SIGKILL
        after 30 s."""
        if self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()

    def workers(self) -> dict[int, tuple[int, int]]:
        found = workers(self.agent.pid)
        self.restarts = max([self.restarts, *(count for _, count in found.values())])
        if time.monotonic() > self.deadline:
            self.stop()
            raise TimeoutError(f"launch still running after {self.deadline - self.start:.0f} s")
        return found

    def wait_for_progress(self, attempt: int) -> bool:
        """Block until all workers of restart ``attempt`` are up and have written a checkpoint
        newer than the newest one when they appeared. False if the launch ended first."""
        base = None
        while self.agent.poll() is None:
            found = self.workers()
            if base is None and [count for _, count in found.values()] == [attempt] * NPROC:
                base = newest_step(self.ckpts)
            if base is not None and newest_step(self.ckpts) > base:
                return True
            time.sleep(0.02)
        return False

    def kill_rank(self, rank: int, attempt: int) -> dict | None:
        """SIGKILL the worker of ``rank`` if it belongs to restart ``attempt``; what the kill left
        (``checkpoint_state`` right after it), or None when there was no such worker."""
        pid, count = self.workers().get(rank, (0, -1))
        step = newest_step(self.ckpts)
        if count != attempt:
            return None
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        left = checkpoint_state(self.ckpts)
        at = round(time.monotonic() - self.start, 2)
        return {"rank": rank, "at_s": at, "after_step": step, **left}

    def wait(self) -> int:
        """The launch's exit status, once it has ended."""
        while self.agent.poll() is None:
            self.workers()
            time.sleep(0.05)
        return self.agent.returncode

    def resumes(self) -> int:
        return self.log.read_text(errors="replace").count("moetrain: resumed from")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training row of the run's ``metrics.jsonl``, in file order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def compare(got: list[tuple[int, float]], ref: list[tuple[int, float]]) -> dict:
    """``steps_once``: the same steps as the reference, each once, in order; ``close``: and every
    loss within rtol 1e-5 of the reference's; ``exact``: and bit for bit equal."""
    steps_once = [s for s, _ in got] == [s for s, _ in ref]
    close = steps_once and all(math.isclose(a, b, rel_tol=1e-5) for (_, a), (_, b) in zip(got, ref))
    return {"steps_once": steps_once, "close": close, "exact": steps_once and got == ref}


def reference(
    data_dir: str, root: Path, steps: int, timeout: float = 300
) -> list[tuple[int, float]]:
    """The uninterrupted launch's per-step losses."""
    run_dir = root / "reference"
    cmd = launch_command(data_dir, run_dir, steps, 0)
    with Launch(cmd, run_dir, root / "ref.log", timeout) as launch:
        if launch.wait() != 0:
            raise RuntimeError(f"the uninterrupted launch failed:\n{launch.tail()}")
    return losses(run_dir)


def kill_ranks(launch: Launch, rng: random.Random, count: int, window: float) -> list[dict]:
    """Up to ``count`` kills, one per restart: once that restart's workers have saved, wait a
    random 0..``window`` s and SIGKILL a random rank. Fewer when the run finishes first."""
    kills = []
    for attempt in range(count):
        if not launch.wait_for_progress(attempt):
            break
        time.sleep(rng.uniform(0.0, window))
        kill = launch.kill_rank(rng.randrange(NPROC), attempt)
        if kill is None:
            break
        kills.append(kill)
    return kills


def trial(
    data_dir: str,
    root: Path,
    index: int,
    rng: random.Random,
    ref: list[tuple[int, float]],
    max_kills: int = 3,
    window: float = 1.5,
    timeout: float = 300,
) -> dict:
    """One trial (see the module docstring) in ``root / trial<index>``. ``ref``: the reference
    losses; its length is the number of steps. Returns the kills (rank, seconds since the start,
    newest complete step, whether mid-save, ``latest`` then), restarts used, the launch's exit
    code, the loss comparison, the final ``latest`` and ``ok``. Raises TimeoutError past
    ``timeout`` s (the launch is stopped)."""
    steps = len(ref)
    run_dir = root / f"trial{index}"
    planned = rng.randint(1, max_kills)
    cmd = launch_command(data_dir, run_dir, steps, planned)
    with Launch(cmd, run_dir, root / f"trial{index}.log", timeout) as launch:
        kills = kill_ranks(launch, rng, planned, window)
        code = launch.wait()
    cmp = compare(losses(run_dir), ref) if (run_dir / "metrics.jsonl").exists() else {}
    end = checkpoint_state(launch.ckpts)
    ok = code == 0 and bool(cmp.get("close")) and end["latest_complete"]
    ok = ok and end["latest"] == f"{steps:08d}" and launch.resumes() == len(kills)
    result = {
        "trial": index,
        "kills": kills,
        "max_restarts": planned,
        "restarts": launch.restarts,
        "resumes": launch.resumes(),
        "exit_code": code,
        **cmp,
        "final_latest": end["latest"],
        "final_latest_complete": end["latest_complete"],
        "ok": ok,
    }
    if not ok:
        result["log_tail"] = launch.tail()
    return result


def summarize(results: list[dict]) -> dict:
    kills = [k for r in results for k in r["kills"]]
    return {
        "trials": len(results),
        "kills": len(kills),
        "kills_mid_save": sum(k["save_in_flight"] for k in kills),
        "latest_incomplete_after_kill": sum(not k["latest_complete"] for k in kills),
        "restarts": sum(r["restarts"] for r in results),
        "trials_ok": sum(r["ok"] for r in results),
        "trials_exact": sum(bool(r.get("exact")) for r in results),
    }


def describe(r: dict) -> str:
    kills = ", ".join(
        f"rank {k['rank']} at {k['at_s']:.1f} s "
        f"({'mid-save' if k['save_in_flight'] else 'between saves'}, after step {k['after_step']})"
        for k in r["kills"]
    )
    losses_ = "exact" if r.get("exact") else "close" if r.get("close") else "DIFFERENT"
    return (
        f"trial {r['trial']:>2}: killed {kills or 'nothing'}; restarts {r['restarts']}/"
        f"{r['max_restarts']}, exit {r['exit_code']}, losses {losses_}, latest "
        f"{r['final_latest']}: {'ok' if r['ok'] else 'FAILED'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-kills", type=int, default=3, help="kills per trial: 1..this")
    parser.add_argument("--window", type=float, default=1.5, help="seconds of random delay")
    parser.add_argument("--seed", type=int, default=0, help="of the trials' random choices")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = write_token_dir(str(root / "tokens"))
        ref = reference(data_dir, root, args.steps)
        results = []
        for i in range(args.trials):
            results.append(trial(data_dir, root, i, rng, ref, args.max_kills, args.window))
            if not args.json:
                print(describe(results[-1]), flush=True)
    summary = summarize(results)
    print(json.dumps({"summary": summary, "trials": results}) if args.json else summary)
    sys.exit(0 if summary["trials_ok"] == summary["trials"] else 1)


if __name__ == "__main__":
    main()
