"""Peak memory per rank at a layout where weights and optimizer state dominate: a ~330M-parameter
fp32 MoE with AdamW. One process holds everything (weights, gradients, two Adam moments); at
world 4 with ``parallel.ep=2`` (experts over ep 2 x FSDP over edp 2, dense weights FSDP over 4)
each rank holds about a quarter, and the meta-device build never materializes the rest. Each
rank's peak resident set size over set-up and 3 steps must be at most 0.45 x the single-process
run's (measured inside the ranks with ``getrusage``, imports included)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from moetrain.testing import run_distributed
from moetrain.testing.layouts import write_token_dir

# 6 MoE layers of 8 experts x 3 x 1024 x 2048 (50.3M each) + attention: ~330M parameters
BIG = [
    "model.dim=1024",
    "model.num_layers=6",
    "model.first_k_dense=0",
    "model.num_heads=8",
    "model.num_kv_heads=4",
    "model.moe.hidden_dim=2048",
    "optim=adamw",
    "optim.lr=1e-4",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
]


def peak_rss(rank: int, world: int, data_dir: str, overrides: list[str]) -> dict:
    from moetrain.config.validate import parallel_dims
    from moetrain.parallel.context import init_parallel
    from moetrain.testing.layouts import layout_config
    from moetrain.train.memory import GB, peak_memory, peak_rss_bytes
    from moetrain.train.trainer import Trainer

    del rank, world
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = layout_config(data_dir, [*BIG, *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), init_parallel(parallel_dims(cfg)))
        setup = peak_rss_bytes() / GB
        for _ in range(3):
            trainer.train_step()
        return {
            "params": trainer.num_params,
            "setup_gb": setup,
            "peak_gb": peak_rss_bytes() / GB,
            "logged": peak_memory(trainer.ctx),  # what metrics.jsonl rows carry
        }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_each_rank_peaks_below_045_of_one_process(tmp_path):
    data_dir = write_token_dir(str(tmp_path / "tokens"))
    (single,) = run_distributed(peak_rss, 1, data_dir, [], timeout=600)
    ranks = run_distributed(peak_rss, 4, data_dir, ["parallel.ep=2"], timeout=600)
    assert single["params"] > 300e6
    print(
        f"single process: {single['peak_gb']:.2f} GB peak (set-up {single['setup_gb']:.2f}); "
        "ranks: " + ", ".join(f"{r['peak_gb']:.2f} (set-up {r['setup_gb']:.2f})" for r in ranks)
    )
    for rank, r in enumerate(ranks):
        assert r["peak_gb"] <= 0.45 * single["peak_gb"], (rank, r, single)
    logged = ranks[0]["logged"]
    assert logged["mem/peak_rss_gb"] == pytest.approx(max(r["peak_gb"] for r in ranks), rel=0.02)
    assert 0 <= logged["mem/peak_rss_rank"] < 4
