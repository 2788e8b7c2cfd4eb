"""``moetrain-train`` start-up as a user meets it: the help page, a config error that imports
none of the heavy optional modules, and launch/torchrun.sh checking the config once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[2] / "launch"

DRIVER = """
import sys
from moetrain.train.cli import main
try:
    main(sys.argv[1:])
finally:
    heavy = ("transformers", "wandb", "matplotlib", "deepspeed", "torch.distributed.pipelining")
    print("IMPORTED", [m for m in heavy if m in sys.modules], file=sys.stderr)
"""


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_help_shows_usage_groups_and_presets(tmp_path):
    proc = run([sys.executable, "-m", "moetrain.train", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("moetrain-train: train a Mixture-of-Experts language model")
    assert "model: deepseek_v3, mixtral_8x7b, olmoe_1b7b, qwen3_30b_a3b, tiny, tiny_dense" in out
    assert "optim: adamw, sgd" in out and "experiment: smoke" in out
    assert "docs/configuration.md" in out and "powered by Hydra" not in out
    assert list(tmp_path.iterdir()) == []


def test_config_error_imports_no_heavy_module(tmp_path):
    proc = run([sys.executable, "-c", DRIVER, "model.moe.top_k=99"], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("moetrain-train: error: model.moe.top_k"), proc.stderr
    assert lines[-1] == "IMPORTED []"
    assert list(tmp_path.iterdir()) == []  # no run directory, no Hydra output dir


def fake_torchrun(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/torchrun_ran\n')
    (bin_dir / "torchrun").chmod(0o755)
    path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"  # python3: this one
    return {**os.environ, "PATH": path, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}


def test_torchrun_script_checks_the_config_once_before_workers(tmp_path):
    env = fake_torchrun(tmp_path)
    script = str(LAUNCH / "torchrun.sh")
    bad = subprocess.run(
        ["bash", script, "parallel.ep=3"], env=env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("moetrain-train: error: parallel.ep: 3 does not divide")
    assert not (tmp_path / "torchrun_ran").exists()  # no worker, no ChildFailedError report
    good = subprocess.run(
        ["bash", script, "parallel.ep=2"], env=env, capture_output=True, text=True, timeout=120
    )
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "torchrun_ran").read_text().split()[-3:] == [
        "-m",
        "moetrain.train",
        "parallel.ep=2",
    ]
