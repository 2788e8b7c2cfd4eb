"""Context parallelism over gloo processes: the chunked attention against full causal attention,
and the correctness contract at cp2, cp2 x ep2 (experts folded over dp_shard x cp), cp2 x tp2
and cp2 x pp2 at a longer sequence with the sequence-scope aux loss."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moetrain.testing import run_distributed
from moetrain.testing.layouts import (
    assert_each_matches,
    train_steps,
    train_steps_each_rank,
    write_token_dir,
)

HEADS = [(6, 2), (5, 1), (3, 3)]  # GQA, multi-query at an odd head count, plain multi-head


def ring_rank(rank: int, world: int) -> list[dict]:
    """Each rank attends its two chunks (cp = world) and returns its outputs and gradients,
    with the full-attention reference every rank computes from the same seed."""
    from moetrain.parallel.cp import ContextParallel
    from moetrain.parallel.ring_attention import local_positions

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cp = ContextParallel(dist.group.WORLD, world, rank)
    out = []
    for heads, kv_heads in HEADS:
        torch.manual_seed(heads)
        B, S, d = 2, 8 * world, 16
        q, k, v = (torch.randn(B, h, S, d) for h in (heads, kv_heads, kv_heads))
        do = torch.randn(B, heads, S, d)
        pos = local_positions(S, rank, world)
        local = [t[:, :, pos].clone().requires_grad_() for t in (q, k, v)]
        o = cp.attention(*local, None)
        o.backward(do[:, :, pos])
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*full, is_causal=True, enable_gqa=heads != kv_heads)
        ref.backward(do)
        got = [o.detach()] + [t.grad for t in local]
        want = [ref.detach()[:, :, pos]] + [t.grad[:, :, pos] for t in full]  # type: ignore[index]
        # bf16 inputs under autocast: computed in fp32 inside, forward and backward alike
        bf16 = [t[:, :, pos].bfloat16().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o16 = cp.attention(*bf16, None)
        o16.backward(do[:, :, pos].bfloat16())
        got16 = [o16.detach().float()] + [t.grad.float() for t in bf16]  # type: ignore[union-attr]
        out.append({"got": got, "want": want, "got_bf16": got16, "dtype": o16.dtype})
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_equals_causal_attention(cp):
    for rank, results in enumerate(run_distributed(ring_rank, cp, timeout=100)):
        for (heads, kv_heads), r in zip(HEADS, results):
            where = f"rank {rank} H={heads} G={kv_heads}"
            assert r["dtype"] == torch.bfloat16, where
            for name, got, got16, want in zip(
                ("o", "dq", "dk", "dv"), r["got"], r["got_bf16"], r["want"]
            ):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"{where} {name}")
                # bf16 inputs: within bf16 rounding of the fp32 reference
                torch.testing.assert_close(
                    got16, want, rtol=0.02, atol=0.02, msg=f"{where} bf16 {name}"
                )


LONG = ["train.seq_len=128", "model.moe.aux_loss_scope=sequence"]
CAPACITY = ["model.moe.capacity_factor=1.0"]
MLA = [
    "model.attention=mla",
    "model.head_dim=null",
    "model.kv_lora_rank=32",
    "model.q_lora_rank=48",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=24",
]
# name: (world, layout, model options); each world's rows run in one launch
ROWS = {
    "cp2": (2, ["parallel.cp=2"], []),
    "cp2_mla": (2, ["parallel.cp=2"], MLA),
    "cp2_ep2": (4, ["parallel.cp=2", "parallel.ep=2"], []),
    "cp2_tp2": (4, ["parallel.cp=2", "parallel.tp=2"], []),
    "cp2_pp2": (4, ["parallel.cp=2", "parallel.pp=2"], []),
    # capacity and its drops computed over the cp group's tokens: as one process
    "cp2_ep2_capacity": (4, ["parallel.cp=2", "parallel.ep=2"], CAPACITY),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_token_dir(str(tmp_path_factory.mktemp("tokens")))


@pytest.mark.timeout(420)
@pytest.mark.parametrize("world", [2, 4])
def test_cp_layouts_equal_single_process(world, data_dir):
    rows = {name: row for name, row in ROWS.items() if row[0] == world}
    refs = {name: train_steps(data_dir, [*LONG, *model]) for name, (_, _, model) in rows.items()}
    seq_scope = train_steps(data_dir, ["train.seq_len=128"])  # micro-batch scope: differs
    assert refs[next(iter(refs))]["aux_loss"] != pytest.approx(seq_scope["aux_loss"], rel=1e-5)
    runs = [[*LONG, *model, *layout] for _, layout, model in rows.values()]
    per_rank = run_distributed(train_steps_each_rank, world, data_dir, runs, 3, timeout=380)
    assert_each_matches(per_rank, refs, f"world {world}")


LONG_SEQ = 4096  # activations dominate: ~0.23 GB of them at cp1 against ~0.02 GB of weights
MEMORY = [
    f"train.seq_len={LONG_SEQ}",
    f"model.max_seq_len={LONG_SEQ}",
    "train.micro_batch_size=1",
    "train.global_batch_size=1",
    "data.val_fraction=0.1",
]


def step_peak(rank: int, world: int, data_dir: str, overrides: list[str]) -> dict:
    """Peak bytes of live tensors over one training step (after a first one), tracked by torch's
    ``MemTracker`` (what ``torch.cuda.max_memory_allocated`` measures on a GPU), and the
    process's peak resident set size."""
    import tempfile
    from pathlib import Path

    from torch.distributed._tools.mem_tracker import MemTracker

    from moetrain.config.validate import parallel_dims
    from moetrain.parallel.context import init_parallel
    from moetrain.testing.layouts import layout_config
    from moetrain.train.memory import GB, peak_rss_bytes
    from moetrain.train.trainer import Trainer

    del rank, world
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = layout_config(data_dir, [*MEMORY, *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), init_parallel(parallel_dims(cfg)))
        trainer.train_step()
        tracker = MemTracker()
        tracker.track_external(*trainer.pm.chunks, trainer.optimizer)
        with tracker:
            trainer.train_step()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        return {"peak_gb": peak["Total"] / GB, "rss_gb": peak_rss_bytes() / GB}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cp2_peak_memory_below_065_of_cp1(tmp_path):
    data_dir = write_token_dir(str(tmp_path / "tokens"), num_tokens=60_000)
    (cp1,) = run_distributed(step_peak, 1, data_dir, [], timeout=280)
    ranks = run_distributed(step_peak, 2, data_dir, ["parallel.cp=2"], timeout=280)
    print(
        f"seq_len {LONG_SEQ}: cp1 peak {cp1['peak_gb']:.3f} GB (rss {cp1['rss_gb']:.2f}); cp2 "
        + ", ".join(f"{r['peak_gb']:.3f} GB (rss {r['rss_gb']:.2f})" for r in ranks)
    )
    for rank, r in enumerate(ranks):
        assert r["peak_gb"] <= 0.65 * cp1["peak_gb"], (rank, r, cp1)


@pytest.mark.timeout(120)
def test_bench_cp_measures_every_variant():
    """``tools/bench_cp.py``'s figures: SDPA, the blockwise algorithm in one process and cp2,
    with the exchanges' share of the cp2 time."""
    from benchmarks.context_parallel import AttentionShape, format_table, run

    shape = AttentionShape(batch=1, heads=4, kv_heads=2, seq_len=128, head_dim=16)
    rows = run(shape, [2], repeats=1)
    assert set(rows) == {"sdpa", "blockwise_cp1", "cp2", "cp2_exchange_share"}
    assert all(v > 0 for v in rows.values()) and rows["cp2_exchange_share"] < 1
    table = format_table(shape, rows, 2)
    assert "cp2" in table and "exchanges" in table
