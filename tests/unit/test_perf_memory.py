"""``moetrain.perf.retain_freed_memory``: freed large blocks stay in the process (no fresh mmap)."""

import subprocess
import sys

import pytest

SCRIPT = """
import torch
from moetrain.perf import retain_freed_memory

def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

if {retain}:
    retain_freed_memory()
before = resident_mb()
x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
del x
print(resident_mb() - before)
"""


def _kept_mb(retain: bool) -> float:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(retain=retain)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc on Linux")
def test_freed_block_is_kept_only_when_asked():
    assert _kept_mb(retain=False) < 16  # glibc unmaps a 64 MB block on free by default
    assert _kept_mb(retain=True) > 48  # kept in the heap for the next allocation
