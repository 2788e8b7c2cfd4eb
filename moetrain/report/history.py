"""A run's whole history from ``<run dir>/metrics.jsonl``, as arrays for the report's plots.

The file holds every logged row of the run across resumes: ``MetricsWriter`` keeps the rows up
to the resumed step and appends after them. ``read_history`` still guards against a rewind it
finds in the file (a training row whose step is not past the last training row's: the rows from
that step on were logged by a process whose work a resume redid), keeping the later rows, so no
step is counted twice. Training rows carry ``loss``, evaluation rows ``val_loss``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]


def parse_rows(text: str) -> list[Row]:
    """The JSON objects of a ``metrics.jsonl`` text that carry a ``step``; a line cut short by a
    crash (not valid JSON) is skipped."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def drop_rewound(rows: list[Row]) -> list[Row]:
    """``rows`` in file order, less the ones a later rewind superseded: a training row at step
    ``s`` not past the previous training row drops every earlier row at step >= ``s``; an
    evaluation row at a step already evaluated drops the earlier evaluation rows from it on."""
    kept: list[Row] = []
    last = {"train": -1, "val": -1}
    for row in rows:
        step = row["step"]
        kind = "val" if "val_loss" in row else "train"
        if step <= last[kind]:
            if kind == "train":
                kept = [r for r in kept if r["step"] < step]
            else:
                kept = [r for r in kept if r["step"] < step or "val_loss" not in r]
        last[kind] = step
        kept.append(row)
    return kept


def read_history(run_dir: Path) -> list[Row]:
    """Every row of the run (all its processes) in ``run_dir/metrics.jsonl``, rewinds removed."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (not a moetrain run dir?)")
    return drop_rewound(parse_rows(path.read_text()))


def train_rows(rows: list[Row]) -> list[Row]:
    """The training rows (the ones with ``loss``), by step."""
    return sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])


def scalar_series(rows: list[Row], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of every row with a numeric ``key``, by step (int64, float64)."""
    pairs = sorted(
        (r["step"], float(r[key]))
        for r in rows
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
    )
    steps = np.array([s for s, _ in pairs], dtype=np.int64)
    return steps, np.array([v for _, v in pairs], dtype=np.float64)


def loss_curves(rows: list[Row]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"loss": (steps, train loss), "val_loss": (steps, validation loss)}``."""
    return {key: scalar_series(rows, key) for key in ("loss", "val_loss")}


def throughput(rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, tokens_per_s)`` of the training rows."""
    return scalar_series(rows, "tokens_per_s")


def expert_load(rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [N], shares [layers, N, experts])``: each MoE layer's share of the routed
    assignments per expert at each logged step; ``shares`` is ``[0, N, 0]`` for a dense model."""
    train = [r for r in train_rows(rows) if "expert_load" in r]
    steps = np.array([r["step"] for r in train], dtype=np.int64)
    if not train or not train[0]["expert_load"]:
        return steps, np.zeros((0, len(train), 0))
    shares = np.array([r["expert_load"] for r in train], dtype=np.float64)  # [N, L, E]
    return steps, shares.transpose(1, 0, 2)


def dead_experts(rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [N], counts [layers, N])``: experts that got no assignment, per MoE layer."""
    train = [r for r in train_rows(rows) if "dead_experts" in r]
    steps = np.array([r["step"] for r in train], dtype=np.int64)
    if not train or not train[0]["dead_experts"]:
        return steps, np.zeros((0, len(train)))
    return steps, np.array([r["dead_experts"] for r in train], dtype=np.float64).T


def drop_rates(rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, dropped_frac)``: the fraction of assignments capacity dropped (all layers)."""
    return scalar_series(train_rows(rows), "dropped_frac")


def drops_by_position(rows: list[Row]) -> np.ndarray:
    """Mean over the logged steps of ``dropped_frac_by_position`` (the dropped fraction in
    equal spans of the sequence); empty without capacity dropping."""
    spans = [
        r["dropped_frac_by_position"] for r in train_rows(rows) if r.get("dropped_frac_by_position")
    ]
    if not spans:
        return np.zeros(0)
    return np.array(spans, dtype=np.float64).mean(axis=0)


def step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges for values logged at ``steps`` (sorted): midpoints between neighbours, the
    ends half a neighbour's gap out (1 step wide for a single step)."""
    s = steps.astype(np.float64)
    if s.size == 0:
        return s
    if s.size == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])
