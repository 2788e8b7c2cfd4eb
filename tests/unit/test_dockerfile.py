"""The GPU Dockerfile (NGC PyTorch base): it lints clean, its base tag ships the torch its header
names (at least setup.py's minimum), and its install keeps the image's torch — run here in a
fresh venv whose torch is the pinned older 2.11.0, outside the venv as NGC's is (slow).

The base image itself cannot be pulled here: what only it can show (NVIDIA's pip constraints,
its toolkit) is left to ``docker build``, whose last RUN checks that csrc's CUDA kernels are
registered — the venv test runs that check too, where a CUDA toolkit is found."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()

# NGC PyTorch release -> the torch minor version inside (NVIDIA's build of it, <minor>.0a0).
# Sources: NVIDIA's PyTorch release notes (docs.nvidia.com/deeplearning/frameworks/
# pytorch-release-notes/rel-25-12.html: "PyTorch container image version 25.12 is based on
# 2.10.0a0+b4e4ee81d3") and the NGC table of NVIDIA's AITune install guide (ai-dynamo/aitune:
# 25.08 2.8a0, 25.10 2.9a0, 26.01 2.10a0, 26.03 2.11a0, 26.05 2.12a0). Add a row, with its
# source, before moving the Dockerfile to another tag.
NGC_TORCH = {
    "25.08": "2.8",
    "25.10": "2.9",
    "25.12": "2.10",
    "26.01": "2.10",
    "26.03": "2.11",
    "26.05": "2.12",
}
TORCH = "2.11.0"  # the older torch the install must keep: the minimum, as on NGC 26.03
# ... as NVIDIA versions its builds (a pre-release: pip ranks it below moetrain's torch>=2.11)
NGC_VERSION = f"{TORCH}a0+ngc"


def minor(version: str) -> tuple[int, int]:
    major, minor_, *_ = version.split(".")
    return int(major), int(minor_)


def base_tag() -> str:
    match = re.search(r"^ARG BASE=nvcr\.io/nvidia/pytorch:(\d\d\.\d\d)-py3$", DOCKERFILE, re.M)
    assert match, "the Dockerfile's ARG BASE is not an NGC PyTorch tag"
    return match.group(1)


def install_script() -> str:
    """The install RUN's shell script (its heredoc)."""
    match = re.search(r"^RUN <<EOF\n(.*?)^EOF$", DOCKERFILE, re.M | re.S)
    assert match, "the install RUN (a heredoc) is missing"
    return match.group(1)


def requirements_script() -> str:
    """The Python that turns moetrain's installed metadata into the requirements pip installs."""
    match = re.search(r"<<'PY'\n(.*?)^PY$", install_script(), re.M | re.S)
    assert match, "the install RUN no longer derives the requirements"
    return match.group(1)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (dev extra)")
def test_hadolint_passes():
    result = subprocess.run(["hadolint", "-"], input=DOCKERFILE, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_tag_ships_the_torch_the_header_names_and_setup_py_accepts():
    tag = base_tag()
    named = re.search(r"^# torch (\d+\.\d+)$", DOCKERFILE, re.M)
    assert named, "the Dockerfile's '# torch X.Y' line is missing"
    assert tag in NGC_TORCH, f"NGC PyTorch {tag}: add its torch, with a source, to NGC_TORCH"
    assert NGC_TORCH[tag] == named.group(1)
    floor = re.search(r'"torch>=(\d+\.\d+)', (ROOT / "setup.py").read_text())
    assert floor, "setup.py's install_requires has no torch>= floor"
    # NVIDIA's <minor>.0a0 is that release's code, though pip ranks it below <minor>.0
    assert minor(NGC_TORCH[tag]) >= minor(floor.group(1))
    assert minor(TORCH) == minor(NGC_TORCH[tag])  # the venv test stands in for that image


def test_no_install_names_torch_and_moetrain_goes_in_without_deps():
    script = install_script()
    installs = [line for line in script.splitlines() if line.startswith("pip install")]
    words = [w for line in installs for w in shlex.split(line)]
    assert installs and not any(re.fullmatch(r"torch([<>=!~\[].*)?", w) for w in words)
    assert not {"-U", "--upgrade", "--force-reinstall"} & set(words)
    assert any("--no-deps" in line and line.endswith(" -e .") for line in installs)
    assert any('-c "$work/torch.txt"' in line for line in installs)
    assert "print('torch==' + m.version('torch'))" in script


def run_requirements_script(monkeypatch, capsys, requires: list[str]) -> list[str]:
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: requires)
    exec(compile(requirements_script(), "Dockerfile", "exec"), {"__name__": "__main__"})
    return capsys.readouterr().out.split()


def test_requirements_are_install_requires_and_test_extra_less_torch(monkeypatch, capsys):
    got = run_requirements_script(
        monkeypatch,
        capsys,
        [
            "torch>=2.11",
            "hydra-core<1.4,>=1.3",
            "numpy>=1.26",
            'pytest>=8; extra == "test"',
            'numpy>=1.26; extra == "test"',
            'ruff==0.17.5; extra == "dev"',
            'deepspeed>=0.19; extra == "bench"',
        ],
    )
    assert got == ["hydra-core<1.4,>=1.3", "numpy>=1.26", "pytest>=8"]


def test_requirements_refuse_a_marker_they_do_not_understand(monkeypatch, capsys):
    with pytest.raises(SystemExit, match="marker not handled"):
        run_requirements_script(monkeypatch, capsys, ['numpy>=1.26; python_version < "3.12"'])


# --- the install in a fresh venv ----------------------------------------------------------------


def wheel_cache() -> Path:
    """Where torch's wheels (about 2.6 GB with its nvidia-* ones) and their install are kept
    between runs: ``$MOETRAIN_WHEEL_CACHE``, else ``~/.cache/moetrain/wheels``."""
    default = Path.home() / ".cache" / "moetrain" / "wheels"
    return Path(os.environ.get("MOETRAIN_WHEEL_CACHE", default))


def torch_tree() -> Path:
    """torch==TORCH and what it needs, installed once (``pip --target``) beside its wheels and
    reused: NGC's system-wide torch, outside the venv the install runs in, and versioned as
    NVIDIA's (:data:`NGC_VERSION`), so that an install which resolves moetrain's own torch
    requirement would replace it, as it would in the image."""
    wheels = wheel_cache()
    tree = wheels / f"torch-{NGC_VERSION}-cp{sys.version_info.major}{sys.version_info.minor}"
    if tree.is_dir():
        return tree
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "-d", wheels, f"torch=={TORCH}"], check=True)
    part = tree.with_name(tree.name + ".part")  # renamed when complete: no half tree is reused
    shutil.rmtree(part, ignore_errors=True)
    offline = ["--no-index", "--find-links", wheels, "--target", part]
    subprocess.run([*pip, "install", "-q", *offline, f"torch=={TORCH}"], check=True)
    metadata = part / f"torch-{TORCH}.dist-info" / "METADATA"
    text = metadata.read_text()
    assert f"\nVersion: {TORCH}\n" in text
    metadata.write_text(text.replace(f"\nVersion: {TORCH}\n", f"\nVersion: {NGC_VERSION}\n", 1))
    part.rename(tree)
    return tree


def copy_sources(dest: Path) -> Path:
    """The working tree's files (tracked or not, less what .gitignore drops: no build, no .so)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def venv_with_outside_torch(path: Path, tree: Path) -> Path:
    """A fresh venv that sees ``tree`` (torch) through a .pth file, with the build requirements
    NGC's image has and a bare venv lacks: pyproject's, within torch's own setuptools bound."""
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (path / "lib" / version / "site-packages" / "ngc_torch.pth").write_text(f"{tree}\n")
    pyproject = (ROOT / "pyproject.toml").read_text()
    build = re.findall(r'"([^"]+)"', re.search(r"^requires = \[(.*?)\]", pyproject, re.M).group(1))
    torch_dist = next(importlib.metadata.distributions(name="torch", path=[str(tree)]))
    bounds = [r for r in torch_dist.requires or [] if r.startswith("setuptools")]
    pip = [path / "bin" / "python", "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *build, *bounds], check=True)
    return path


def cuda_toolkit() -> str | None:
    """A CUDA toolkit to build csrc's CUDA kernels with, as the image does: ``$CUDA_HOME``, else
    /usr/local/cuda when it has nvcc (torch's own guess may be a wrapper script's directory)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    return "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").is_file() else None


def dockerfile_env() -> dict[str, str]:
    match = re.search(r"^ENV (.*?)\n\n", DOCKERFILE, re.M | re.S)
    assert match, "the Dockerfile's ENV block is missing"
    return dict(w.split("=", 1) for w in shlex.split(match.group(1).replace("\\\n", " ")))


def cuda_check_command() -> str:
    """The last RUN: csrc's CUDA kernels are registered (a build has no GPU to run them on)."""
    joined = DOCKERFILE.replace("\\\n", "")
    (command,) = re.findall(r"^RUN (python -c .*active_backend.*CUDA.*)$", joined, re.M)
    return command


@pytest.mark.slow  # first run: ~2.6 GB of wheels and their install; then the csrc build
@pytest.mark.timeout(1800)
def test_install_keeps_an_older_torch_and_builds_csrc(tmp_path):
    tree = torch_tree()
    venv = venv_with_outside_torch(tmp_path / "venv", tree)
    src = copy_sources(tmp_path / "src")
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "MOETRAIN_NO_CSRC", "CUDA_HOME")
    env = {k: v for k, v in os.environ.items() if k not in drop} | dockerfile_env()
    env |= {"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    cuda_home = cuda_toolkit()
    if cuda_home is not None:
        env["CUDA_HOME"] = cuda_home

    def sh(script: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", "-c", script], cwd=src, env=env, capture_output=True, text=True, check=False
        )

    installed = sh(install_script())
    assert installed.returncode == 0, installed.stdout[-4000:] + installed.stderr[-4000:]
    probe = sh(
        "python -c 'import importlib.metadata as m, torch, moetrain, moetrain.ops as o; "
        'print(m.version("torch"), torch.__file__, moetrain.__file__, o.active_backend("CPU"), '
        "sep=chr(10))'"
    )
    assert probe.returncode == 0, probe.stderr[-4000:]
    version, torch_file, moetrain_file, cpu_backend = probe.stdout.splitlines()[-4:]
    assert version == NGC_VERSION and Path(torch_file).is_relative_to(tree)  # kept
    assert Path(moetrain_file).is_relative_to(src)
    assert cpu_backend.startswith("csrc"), cpu_backend
    if cuda_home is not None:  # the image's build check, as docker build runs it
        checked = sh(cuda_check_command())
        assert checked.returncode == 0, checked.stdout + checked.stderr[-4000:]
