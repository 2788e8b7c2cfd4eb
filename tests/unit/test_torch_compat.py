"""moetrain runs on torch 2.11 (setup.py's bound) and newer: ``moetrain.torch_compat`` covers the
API differences, no module uses an API the oldest release lacks, and the release CI's
``torch_min`` tier installs is the bound setup.py declares."""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moetrain import torch_compat

ROOT = Path(__file__).resolve().parents[2]

# torch.distributed functions torch 2.11 lacks -> what to call instead
MISSING_IN_OLDEST = {
    "all_gather_single": "moetrain.torch_compat.all_gather_single",
    "reduce_scatter_single": "moetrain.torch_compat.reduce_scatter_single",
}


def test_all_gather_single_gathers_without_a_deprecation_warning(one_process_group):
    local = torch.tensor([3, 0, 5])
    out = local.new_empty(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 2.13 deprecates the old name with a FutureWarning
        torch_compat.all_gather_single(out, local)
    assert out.tolist() == [3, 0, 5]


@pytest.mark.parametrize(
    "new, old",
    [
        ("all_gather_single", "all_gather_into_tensor"),
        ("reduce_scatter_single", "reduce_scatter_tensor"),
    ],
)
def test_falls_back_to_the_old_name(new, old, one_process_group, monkeypatch):
    monkeypatch.delattr(dist, new, raising=False)  # as in torch 2.11
    calls = []
    original = getattr(dist, old)

    def spy(output, input, **kwargs):
        calls.append(kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return original(output, input, **kwargs)

    monkeypatch.setattr(dist, old, spy)
    out = torch.empty(2)
    getattr(torch_compat, new)(out, torch.tensor([1.0, 2.0]), group=dist.group.WORLD)
    assert out.tolist() == [1.0, 2.0]
    assert calls == [{"group": dist.group.WORLD}]


def test_reduce_scatter_single_without_a_deprecation_warning(one_process_group):
    out = torch.empty(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 2.13 deprecates reduce_scatter_tensor
        torch_compat.reduce_scatter_single(out, torch.tensor([1.0, 4.0, 2.0]))
    assert out.tolist() == [1.0, 4.0, 2.0]


def test_all_gather_single_is_looked_up_per_call(monkeypatch):
    # benchmarks/fssdp.py counts bytes by wrapping the torch.distributed function
    seen = []
    monkeypatch.setattr(
        dist, "all_gather_single", lambda o, i, **kw: seen.append(kw), raising=False
    )
    torch_compat.all_gather_single(torch.empty(1), torch.empty(1), async_op=False)
    assert seen == [{"async_op": False}]


def _direct_uses(path: Path, root: Path = ROOT) -> list[str]:
    """``dist.<name>`` / ``torch.distributed.<name>`` uses of a MISSING_IN_OLDEST name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in MISSING_IN_OLDEST:
            owner = ast.unparse(node.value)
            if owner in ("dist", "torch.distributed"):
                fix = MISSING_IN_OLDEST[node.attr]
                found.append(
                    f"{path.relative_to(root)}:{node.lineno}: {owner}.{node.attr} -> {fix}"
                )
    return found


def test_no_module_calls_an_api_the_oldest_torch_lacks():
    compat = ROOT / "moetrain" / "torch_compat.py"
    files = [p for d in ("moetrain", "benchmarks", "tools") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 100
    found = [use for p in files if p != compat for use in _direct_uses(p)]
    assert not found, "torch 2.11 lacks these: " + "; ".join(found)


def test_the_scan_finds_a_direct_use(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\nimport torch.distributed as dist\n"
        "dist.all_gather_single(a, b)\ntorch.distributed.all_gather_single(a, b)\n"
        "dist.all_gather_into_tensor(a, b)\nother.all_gather_single(a, b)\n"
    )
    fix = "moetrain.torch_compat.all_gather_single"
    assert _direct_uses(bad, tmp_path) == [
        f"bad.py:3: dist.all_gather_single -> {fix}",
        f"bad.py:4: torch.distributed.all_gather_single -> {fix}",
    ]


def test_ci_runs_the_unit_tier_on_the_oldest_torch_setup_py_allows():
    bound = re.search(r'"torch>=(\d+)\.(\d+)"', (ROOT / "setup.py").read_text())
    assert bound, "setup.py's install_requires has no torch>=X.Y bound"
    ci = (ROOT / ".ci" / "run").read_text()
    tier = re.search(r"^ci_torch_min\(\) \{.*?^\}", ci, re.S | re.M)
    assert tier, ".ci/run has no ci_torch_min tier"
    assert f"pip install -q torch=={bound[1]}.{bound[2]}.0 " in tier[0]
    assert "python -m pytest tests/unit" in tier[0]
    assert re.search(r"^tier torch_min \d+ ci_torch_min$", ci, re.M)
