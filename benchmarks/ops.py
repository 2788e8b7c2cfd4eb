"""Side-by-side timings of the dispatch/combine ops: the csrc kernels vs the pure-torch references.

For each benchmark shape: forward+backward of ``permute`` (gather; its backward a scatter-add)
and of the weighted ``unpermute`` (combine; its backward a gather and the weight gradient), on
the rows the dispatcher builds for that shape's routing, once with the compiled kernels and once
inside ``moetrain.ops.reference_kernels()``, in the same process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from benchmarks.peers import Shape
from moetrain.moe.capacity import capacity_keep_mask, expert_capacity
from moetrain.moe.dispatcher import Routing, sort_by_expert
from moetrain.ops import extension_error, permute, reference_kernels, unpermute
from moetrain.perf import median_time


@dataclass
class OpRow:
    case: str
    mode: str
    op: str
    rows: int
    csrc_seconds: float | None = None
    reference_seconds: float | None = None
    note: str = ""


def _routing(shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_token_R, row_weight_R)`` for a near-uniform routing, as at initialization."""
    gen = torch.Generator().manual_seed(0)
    T, E, K = shape.num_tokens, shape.num_experts, shape.top_k
    scores = torch.rand(T, E, generator=gen)
    weights, ids = scores.topk(K, dim=-1)
    keep = None
    if shape.capacity_factor is not None:
        C = expert_capacity(T, E, K, shape.capacity_factor, min_capacity=4)
        keep = capacity_keep_mask(ids, weights, E, C, "probs")
    rows = sort_by_expert(Routing(ids, weights, keep), E)
    return rows.row_token_R, rows.row_weight_R


def op_steps(shape: Shape) -> dict[str, tuple[int, Callable[[], None]]]:
    """op name -> (rows, one forward+backward step) at ``shape``."""
    gen = torch.Generator().manual_seed(1)
    row_token, weight = _routing(shape)
    R, T, D = len(row_token), shape.num_tokens, shape.dim
    x = torch.randn(T, D, generator=gen).requires_grad_(True)
    rows = torch.randn(R, D, generator=gen).requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    grad_rows = torch.randn(R, D, generator=gen)
    grad_y = torch.randn(T, D, generator=gen)

    def permute_step() -> None:
        x.grad = None
        permute(x, row_token).backward(grad_rows)

    def unpermute_step() -> None:
        rows.grad = w.grad = None
        unpermute(rows, row_token, w, T).backward(grad_y)

    return {"permute": (R, permute_step), "unpermute": (R, unpermute_step)}


def time_ops(shapes: list[Shape], repeats: int) -> list[dict]:
    """Every op's median forward+backward at every shape, csrc (when loaded) and reference."""
    out = []
    missing = extension_error()
    for shape in shapes:
        for op, (num_rows, step) in op_steps(shape).items():
            row = OpRow(shape.name, shape.mode, op, num_rows)
            if missing is None:
                row.csrc_seconds = median_time(step, repeats=repeats)
            else:
                row.note = f"csrc not loaded: {missing}"
            with reference_kernels():
                row.reference_seconds = median_time(step, repeats=repeats)
            out.append(asdict(row))
    return out


def format_ops_table(rows: list[dict]) -> str:
    """``time_ops``' rows as a table with the csrc speedup."""
    lines = [
        "dispatch/combine ops, forward+backward (median): csrc kernels vs pure-torch reference",
        f"{'case':8} {'mode':9} {'op':10} {'rows':>7} {'csrc':>9} {'reference':>10} {'speedup':>8}",
    ]
    for r in rows:
        ref = f"{r['reference_seconds'] * 1e3:8.1f}ms"
        if r["csrc_seconds"] is None:
            lines.append(f"{r['case']:8} {r['mode']:9} {r['op']:10} {r['rows']:7d} {r['note']}")
            continue
        speedup = r["reference_seconds"] / r["csrc_seconds"]
        lines.append(
            f"{r['case']:8} {r['mode']:9} {r['op']:10} {r['rows']:7d} "
            f"{r['csrc_seconds'] * 1e3:7.1f}ms {ref:>10} {speedup:7.2f}x"
        )
    return "\n".join(lines)
