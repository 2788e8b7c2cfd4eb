"""Context-parallel attention, side by side in one run: forward + backward of causal attention
over one long sequence with torch's SDPA in one process, the same blockwise online-softmax
algorithm in one process (every chunk local), and split over cp gloo processes (each holding 2
load-balanced chunks, one intra-op thread each), with the share of the cp time spent in the
key/value exchanges.

Legend: B sequences, H query heads, G key/value heads, S sequence length, d head dim.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moetrain.parallel import cp as cp_module
from moetrain.parallel.ring_attention import blockwise_backward, blockwise_forward


@dataclass(frozen=True)
class AttentionShape:
    batch: int = 1
    heads: int = 8
    kv_heads: int = 2
    seq_len: int = 4096
    head_dim: int = 64

    def tensors(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        B, S, d = self.batch, self.seq_len, self.head_dim
        q = torch.randn(B, self.heads, S, d, generator=g)
        k = torch.randn(B, self.kv_heads, S, d, generator=g)
        v = torch.randn(B, self.kv_heads, S, d, generator=g)
        do = torch.randn(B, self.heads, S, d, generator=g)
        return q, k, v, do


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_sdpa(shape: AttentionShape, repeats: int) -> float:
    """SDPA (causal) forward + backward in this process (one thread)."""
    q, k, v, do = shape.tensors()
    gqa = shape.heads != shape.kv_heads

    def step() -> None:
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa).backward(do)

    return _median_time(step, repeats)


def time_blockwise(shape: AttentionShape, repeats: int) -> float:
    """The blockwise algorithm with the whole sequence local (2 chunks, cp = 1)."""
    q, k, v, do = shape.tensors()
    scale = shape.head_dim**-0.5
    ks, vs = list(k.chunk(2, dim=2)), list(v.chunk(2, dim=2))

    def step() -> None:
        o, lse = blockwise_forward(list(q.chunk(2, dim=2)), (0, 1), ks, vs, scale)
        blockwise_backward(do, q, o, lse, (0, 1), ks, vs, scale)

    return _median_time(step, repeats)


def cp_worker(rank: int, world: int, shape: AttentionShape, repeats: int) -> dict[str, float]:
    """``run_distributed`` entry point: forward + backward of this rank's chunks over the cp
    group (= the world), timing the key/value exchanges apart."""
    from moetrain.parallel.ring_attention import local_positions

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cp = cp_module.ContextParallel(dist.group.WORLD, world, rank)
    q, k, v, do = shape.tensors()
    pos = local_positions(shape.seq_len, rank, world)
    q, k, v, do = (t[:, :, pos].contiguous() for t in (q, k, v, do))
    exchange = [0.0]
    gather, reduce = cp_module._all_gather, cp_module._sum_own_part

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args)
            exchange[0] += time.perf_counter() - start
            return out

        return wrapper

    cp_module._all_gather, cp_module._sum_own_part = timed(gather), timed(reduce)
    try:

        def step() -> None:
            qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
            cp.attention(qs, ks, vs, None).backward(do)
            dist.barrier()  # the slowest rank's time

        total = _median_time(step, repeats)
        exchange[0] = 0.0
        step()
        return {"seconds": total, "exchange_seconds": exchange[0]}
    finally:
        cp_module._all_gather, cp_module._sum_own_part = gather, reduce


def run(shape: AttentionShape, cps: list[int], repeats: int) -> dict[str, Any]:
    """Every figure of one run: seconds per forward + backward, and ratios to SDPA."""
    from moetrain.testing import run_distributed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each cp process
    try:
        rows: dict[str, Any] = {
            "sdpa": time_sdpa(shape, repeats),
            "blockwise_cp1": time_blockwise(shape, repeats),
        }
    finally:
        torch.set_num_threads(threads)
    for cp in cps:
        ranks = run_distributed(cp_worker, cp, shape, repeats, timeout=1800)
        rows[f"cp{cp}"] = max(r["seconds"] for r in ranks)
        rows[f"cp{cp}_exchange_share"] = max(r["exchange_seconds"] for r in ranks) / max(
            r["seconds"] for r in ranks
        )
    return rows


def format_table(shape: AttentionShape, rows: dict[str, Any], cores: int) -> str:
    lines = [
        f"causal attention fwd+bwd: B={shape.batch} H={shape.heads} G={shape.kv_heads} "
        f"S={shape.seq_len} d={shape.head_dim}, fp32, one thread per process ({cores} cores)",
        f"{'variant':<16} {'seconds':>9} {'x SDPA':>8}  note",
    ]
    sdpa = rows["sdpa"]
    for name, value in rows.items():
        if name.endswith("_exchange_share"):
            continue
        note = ""
        if f"{name}_exchange_share" in rows:
            share = rows[f"{name}_exchange_share"]
            note = f"slowest rank; exchanges {100 * share:.0f}% of it"
        lines.append(f"{name:<16} {value:>9.4f} {value / sdpa:>8.2f}  {note}")
    return "\n".join(lines)
