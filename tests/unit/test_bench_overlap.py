"""tools/bench_overlap.py's analysis: the efficiency formula, the byte accounting on hand-made
exchanges, the summary, the refusal without root, and one tiny worker run on a 1-process group
(no timing is checked: docs/benchmarks.md)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from benchmarks import common, overlap
from benchmarks.overlap import (
    Shape,
    min_bytes,
    overlap_efficiency,
    parse_chunks,
    routed_rows_by_place,
    sent_bytes,
    summarize,
)
from benchmarks.overlap_report import format_table

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_overlap.py"


def test_efficiency_is_the_hidden_share_of_the_smaller_term():
    # serial 10 = comm 4 + compute 5 + 1; overlapped 7 hides 3 of min(4, 5) = 4
    assert overlap_efficiency(10.0, 7.0, 4.0, 5.0) == pytest.approx(0.75)
    assert overlap_efficiency(10.0, 10.0, 4.0, 5.0) == 0.0
    assert overlap_efficiency(10.0, 11.0, 6.0, 2.0) == pytest.approx(-0.5)  # slower than serial
    with pytest.raises(ValueError, match="positive"):
        overlap_efficiency(1.0, 1.0, 0.0, 1.0)


def test_sent_bytes_excludes_self_and_splits_off_inter_node():
    # global rank 1 on node 0 (2 ranks per node) sends 3, 0, 5, 7 rows of 8 bytes to ranks 0..3
    assert sent_bytes([0, 1, 2, 3], [3, 0, 5, 7], 1, 8, 2) == ((3 + 5 + 7) * 8, (5 + 7) * 8)
    # rows to itself never leave the process
    assert sent_bytes([0, 1, 2, 3], [0, 9, 0, 0], 1, 8, 2) == (0, 0)
    # a peer group (one rank per node: global ranks 1 and 3): everything off-rank is inter-node
    assert sent_bytes([1, 3], [4, 6], 1, 8, 2) == (6 * 8, 6 * 8)
    # a node group (global ranks 2 and 3 on node 1): nothing crosses nodes
    assert sent_bytes([2, 3], [4, 6], 2, 8, 2) == (6 * 8, 0)


def test_minimum_counts_every_routed_row_once_per_exchange():
    assert min_bytes(routed_rows=10, dim=4, dtype_bytes=4) == 4 * 10 * 4 * 4
    # E = 8 over 4 ranks (2 each), 2 ranks per node; rank 1 routes 3, 7, 11, 15 rows to ranks 0..3
    counts_E = torch.arange(1, 9)
    rows = routed_rows_by_place(counts_E, rank=1, world=4, per_node=2)
    assert rows == {"routed": 36, "remote": 36 - 7, "inter_node": 11 + 15}


def test_summary_picks_the_best_overlapped_variant():
    times = {
        "flat_c1": 10.0,
        "flat_c2": 8.0,
        "flat_c4": 7.0,
        "hier_c1": 6.0,  # the 2-D exchange without overlap: reported, never "best overlapped"
        "hier_c4": 9.0,
        "comm_only": 4.0,
        "compute_only": 5.0,
        "no_comm": 6.0,
    }
    s = summarize(times)
    assert s["best_variant"] == "flat_c4"
    assert s["overlap_efficiency"] == pytest.approx(0.75)
    assert s["efficiency"]["hier_c1"] == pytest.approx(1.0)
    assert "flat_c1" not in s["efficiency"]
    assert s["bound_seconds"] == 6.0  # max(comm, no_comm)
    assert s["rest_seconds"] == pytest.approx(1.0)  # no_comm - compute
    assert s["exposed_comm_seconds"] == pytest.approx(4.0)  # serial - no_comm


def test_chunks_must_overlap():
    assert parse_chunks("2,4") == [2, 4]
    with pytest.raises(ValueError, match="> 1"):
        parse_chunks("1,4")


def test_without_root_the_tool_says_sudo_and_exits_3(monkeypatch, capsys):
    monkeypatch.setattr(common.os, "geteuid", lambda: 1000)
    monkeypatch.setattr("sys.argv", ["bench_overlap.py"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(TOOL), run_name="__main__")
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert "root" in err and "sudo" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.timeout(120)
def test_worker_runs_on_one_process(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        result = overlap.measure(Shape(tokens=16, dim=8, hidden_dim=8), [2], 1, per_node=1)
    finally:
        dist.destroy_process_group()
    expected = {"flat_c1", "flat_c2", "hier_c1", "hier_c2", "comm_only", "compute_only", "no_comm"}
    assert set(result["times"]) == expected
    assert result["best_variant"] in ("flat_c2", "hier_c2")  # the overlapped ones only
    assert result["routed_rows"] == 16 * 2
    assert result["min_bytes"] == min_bytes(32, 8, 4)
    # one rank: every row is a self-send, nothing leaves the process
    assert all(b == {"sent": 0, "inter_node": 0} for b in result["bytes_per_step"].values())
    table = format_table(
        {"overlap_efficiency": 0.0, "best_variant": "x", "rate": "none", "runs": {"none": result}}
    )
    assert "flat_c2" in table and "comm_only" in table
