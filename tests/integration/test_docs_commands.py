"""The first hour, as the docs tell it: the README's quick-start commands and every command of
docs/quickstart.md, read from their fenced ``bash`` blocks and run in order in one empty
directory with a few steps each. The install commands are not run (this environment is
installed) but must be the pinned ones; the README's test command is checked, not run (it would
run this test again). A command no rule here knows fails the test: a new command in the docs
needs a way to run it small."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
# appended to every moetrain-train: a seconds-long run (moetrain/configs/experiment/smoke.yaml)
SMALL_TRAIN = "experiment=smoke train.steps=3"
TORCH_PIN = f"pip install torch=={torch.__version__.split('+')[0]}"
INSTALLS = {
    TORCH_PIN,
    "pip install --no-build-isolation -e .",
    'pip install --no-build-isolation -e ".[test,dev]"',
}
TEST_COMMAND = "python -m pytest"
# what each kind of command prints when it worked
DONE = {
    "moetrain-train": "moetrain: done; val loss",
    "moetrain-convert": "verify: ok",
    "python tools/compare_dense.py": "MoE - dense validation loss:",
}


def bash_blocks(path: Path, section: str | None = None) -> list[str]:
    """The fenced ``bash`` blocks of ``path`` (of its ``## <section>`` only, if given)."""
    text = path.read_text()
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def commands(blocks: list[str]) -> list[str]:
    """Each command of the blocks, ``a && b`` split in two, in order."""
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [
        c.strip() for line in lines if line and not line.startswith("#") for c in line.split("&&")
    ]


def small(command: str) -> str:
    """``command`` as the test runs it: a few steps, this checkout's tools."""
    if command.startswith("moetrain-train"):
        return f"{command} {SMALL_TRAIN}"
    if command.startswith("python tools/compare_dense.py"):
        tool = shlex.quote(str(ROOT / "tools" / "compare_dense.py"))
        rest = command.removeprefix("python tools/compare_dense.py")
        return f"{shlex.quote(sys.executable)} {tool}{rest} --steps 2 {SMALL_TRAIN}"
    if command.startswith("moetrain-convert"):
        return command
    raise AssertionError(f"the docs run {command!r}, which this test has no small form of")


def to_run(cmds: list[str]) -> list[str]:
    """The commands that run: installs checked for their pins and dropped."""
    out = []
    for command in cmds:
        if command.startswith("pip "):
            assert command in INSTALLS, f"{command!r} is not a pinned install ({TORCH_PIN})"
        else:
            out.append(command)
    return out


def readme_commands() -> list[list[str]]:
    blocks = bash_blocks(ROOT / "README.md", "Quick start (fresh machine, CPU)")
    assert len(blocks) == 2, "the README's quick start has an install+train and a test command"
    return [commands([b]) for b in blocks]


def test_readme_quick_start_commands_are_pinned():
    train, tests = readme_commands()
    assert train == [TORCH_PIN, "pip install --no-build-isolation -e .", "moetrain-train"]
    assert tests[:2] == [TORCH_PIN, 'pip install --no-build-isolation -e ".[test,dev]"']
    assert to_run(tests) == [TEST_COMMAND]  # run by CI, not recursively from here


def test_readme_arch_table_matches_the_adapters():
    from moetrain.checkpoint.hf import ARCHS
    from moetrain.train.cli import compose_config

    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (`[a-z0-9_`, /]+`) \| .* \| (.*) \|$", text, flags=re.M)
    assert rows, "the README's --arch table"
    for archs, presets in rows:
        for preset in re.findall(r"`(\w+)`", presets.split("(not")[0]):
            cfg = OmegaConf.to_object(compose_config([f"model={preset}"])).model  # type: ignore[union-attr]
            for arch in re.findall(r"`(\w+)`", archs):
                if arch == "qwen3" and "(not `qwen3`)" in presets:
                    continue
                assert ARCHS[arch].fits(cfg) == [], (arch, preset)


@pytest.mark.timeout(400)
def test_docs_commands_run(tmp_path):
    readme_train = to_run(readme_commands()[0])
    quick = to_run(commands(bash_blocks(ROOT / "docs" / "quickstart.md")))
    assert quick[0] == readme_train[0] == "moetrain-train"  # the same first run: run it once
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "2",
    }
    for command in quick:
        run = small(command)
        proc = subprocess.run(
            ["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"{run}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        done = next(v for k, v in DONE.items() if command.startswith(k))
        assert done in proc.stdout, f"{run}\n{proc.stdout[-2000:]}"
