"""The GPU Dockerfile installs what the README's test command installs, with the same flags, and
never the README's CPU torch pin (the NGC image's CUDA torch must stay)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_install_args() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"pip install torch==\S+ && pip install (.+?) && python -m pytest", readme)
    assert match, "the README's test command changed shape"
    return shlex.split(match.group(1))


def dockerfile_pip_installs() -> list[list[str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    runs = [line.removeprefix("RUN ") for line in text.splitlines() if line.startswith("RUN ")]
    installs = []
    for run in runs:
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


def test_dockerfile_installs_the_readme_extras_and_flags():
    (install,) = dockerfile_pip_installs()
    want = readme_install_args()
    assert [w for w in install if w != "--no-cache-dir"] == want


def test_dockerfile_keeps_the_images_torch():
    text = (ROOT / "Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\btorch\s*[=<>~]", code), "a torch pin would replace the CUDA build"
    assert re.search(r"^FROM \$\{BASE\}", text, re.M)
    assert "nvcr.io/nvidia/pytorch:" in text


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (dev extra)")
def test_hadolint_passes():
    result = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
