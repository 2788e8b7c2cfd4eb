"""Kill-during-save trial: SIGKILL a training run that checkpoints every step at random moments,
then check that ``latest`` never points at an incomplete checkpoint and that resuming succeeds.

    python tools/kill_during_save_trial.py --trials 24 [--json]

Each trial starts a fresh run (tiny model, a checkpoint after every step), waits for its first
checkpoint activity, sleeps a random 0-2 s, kills it with SIGKILL, records whether a save was in
flight (a ``.tmp-*`` directory left behind), verifies the checkpoint ``latest`` names (checksums)
and runs the same command again for two more steps, which must resume from the newest complete
checkpoint and exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moetrain.checkpoint import find_latest, verify
from moetrain.testing.layouts import small_run_command, write_token_dir


def command(data_dir: str, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """``python -m moetrain.train`` for ``steps`` steps of the tiny model with a checkpoint after
    every step (constant lr, no periodic evaluation); ``extra`` overrides come last and win."""
    return small_run_command(
        data_dir,
        run_dir,
        f"train.steps={steps}",
        "train.eval_interval=0",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "checkpoint.interval=1",
        *extra,
    )


def checkpoint_state(ckpts: Path) -> dict:
    """The state of checkpoint directory ``ckpts`` (read right after a kill: what it left):
    ``save_in_flight``, whether a ``.tmp-*`` directory exists; ``latest``, the directory the
    ``latest`` pointer names (None before the first checkpoint); ``latest_complete``, whether that
    checkpoint is complete and intact (checksums; True when there is none)."""
    names = [p.name for p in ckpts.iterdir()] if ckpts.is_dir() else []
    latest_file = ckpts / "latest"
    latest = latest_file.read_text().strip() if latest_file.exists() else None
    return {
        "save_in_flight": any(n.startswith(".tmp-") for n in names),
        "latest": latest,
        "latest_complete": latest is None or verify(ckpts / latest) is None,
    }


def trial(data_dir: str, root: Path, index: int, rng: random.Random) -> dict:
    run_dir = root / f"trial{index}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        command(data_dir, run_dir, 10_000),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = run_dir / "checkpoints"
    while not (ckpts.is_dir() and any(ckpts.iterdir())):
        if proc.poll() is not None:
            raise RuntimeError(f"trial {index}: the run exited early")
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 2.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = checkpoint_state(ckpts)
    newest = find_latest(ckpts)
    resume_step = int(newest.name) if newest is not None else 0
    again = subprocess.run(
        command(data_dir, run_dir, resume_step + 2),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    resumed = again.returncode == 0 and (newest is None or "resumed from" in again.stdout)
    return {
        "trial": index,
        "killed_mid_save": left["save_in_flight"],
        "latest": left["latest"],
        "latest_complete": left["latest_complete"],
        "resumed_from_step": resume_step,
        "resume_ok": resumed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_token_dir(str(Path(tmp) / "tokens"))
        results = [trial(data_dir, Path(tmp), i, rng) for i in range(args.trials)]
    summary = {
        "trials": len(results),
        "killed_mid_save": sum(r["killed_mid_save"] for r in results),
        "latest_incomplete": sum(not r["latest_complete"] for r in results),
        "resume_failed": sum(not r["resume_ok"] for r in results),
    }
    if args.json:
        print(json.dumps({"summary": summary, "trials": results}))
        return
    for r in results:
        when = "mid-save" if r["killed_mid_save"] else "between saves"
        print(
            f"trial {r['trial']:>2}: killed {when}, latest={r['latest']} "
            f"complete={r['latest_complete']}, resumed from step "
            f"{r['resumed_from_step']}: {'ok' if r['resume_ok'] else 'FAILED'}"
        )
    print(summary)
    sys.exit(0 if summary["latest_incomplete"] == 0 and summary["resume_failed"] == 0 else 1)


if __name__ == "__main__":
    main()
