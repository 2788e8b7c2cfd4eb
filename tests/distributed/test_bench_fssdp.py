"""tools/bench_fssdp.py's library half runs end to end on 2 gloo processes at a tiny shape and
reports every figure under the documented keys (no timing is checked: machines are noisy)."""

from __future__ import annotations

import pytest

from benchmarks.fssdp import Shape, figures, format_table, run_loopback


@pytest.mark.timeout(180)
def test_bench_reports_every_figure_per_skew():
    shape = Shape(num_experts=8, top_k=2, dim=16, hidden_dim=32, tokens=256)
    skews = ["uniform", "zipf1.5", "hot"]
    result = run_loopback(shape, skews, repeats=1, pin=False, layouts=("ep", "fssdp", "fssdp_keep"))
    flat = figures(result)
    for skew in skews:
        for key in ("speedup", "memory_ratio", "speedup_fssdp_keep"):
            assert flat[f"{key}_{skew}"] > 0
        for layout in ("ep", "fssdp", "fssdp_keep"):
            for key in ("seconds", "straggler", "bytes", "fraction", "peak_mem"):
                assert f"{key}_{layout}_{skew}" in flat
    # the placement balances what static EP cannot
    assert flat["straggler_ep_zipf1.5"] > 1.3 > flat["straggler_fssdp_zipf1.5"]
    assert flat["straggler_ep_hot"] > flat["straggler_fssdp_hot"]
    rows = {(r["skew"], r["layout"]): r for r in result["rows"]}
    for skew in skews:
        ep, fs, keep = (rows[(skew, lay)] for lay in ("ep", "fssdp", "fssdp_keep"))
        assert ep["weight_bytes"] == 0 and fs["weight_bytes"] > 0
        # without rematerialization the experts are gathered once, not twice: 2/3 of the bytes
        assert keep["weight_bytes"] * 3 == fs["weight_bytes"] * 2
        # the same routing for every layout: the same expert rows in total
        assert sum(ep["rows_per_rank"]) == sum(fs["rows_per_rank"]) == sum(keep["rows_per_rank"])
    assert "zipf1.5" in format_table(result, "loopback")
