"""``report.html``: one self-contained page (PNG figures embedded as base64, inline CSS, no
network resources) over a run's whole history, and ``expert_load.png`` beside it."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetrain.report import history, plots
from moetrain.report.history import Row

STYLE = (
    "body{font-family:sans-serif;max-width:880px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse}td{padding:2px 12px 2px 0}"
    "img{max-width:100%;display:block;margin:0.5em 0 1.5em}h2{margin-top:1.5em}"
)


@dataclass
class Report:
    html: Path
    expert_load: Path | None  # None for a dense model


def summary(rows: list[Row]) -> list[tuple[str, str]]:
    """The report's head table: what the history covers and where it ended."""
    train = history.train_rows(rows)
    steps, val = history.loss_curves(rows)["val_loss"]
    _, tps = history.throughput(rows)
    out = [("training rows", str(len(train))), ("validation rows", str(len(steps)))]
    if train:
        out.append(("steps logged", f"{train[0]['step']} .. {train[-1]['step']}"))
        out.append(("last train loss", f"{train[-1]['loss']:.4f} (step {train[-1]['step']})"))
    if steps.size:
        out.append(("last validation loss", f"{val[-1]:.4f} (step {steps[-1]})"))
    if tps.size:
        out.append(("median tokens/s", f"{float(np.median(tps)):,.0f}"))
    return out


def _meta_rows(run_dir: Path) -> list[tuple[str, str]]:
    path = run_dir / "run_meta.json"
    if not path.is_file():
        return []
    meta = json.loads(path.read_text())
    out = []
    for key in ("params_total", "params_active", "world_size", "torch"):
        if key in meta:
            out.append((key.replace("_", " "), str(meta[key])))
    return out


def _img(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    alt = html.escape(title)
    return f'<h2>{alt}</h2>\n<img alt="{alt}" src="data:image/png;base64,{data}">'


def render_html(run_dir: Path, rows: list[Row], figures: list[tuple[str, bytes]]) -> str:
    """The page: a summary table, then each ``(title, png)`` figure."""
    table = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
        for k, v in summary(rows) + _meta_rows(run_dir)
    )
    body = "\n".join(_img(title, png) for title, png in figures)
    title = html.escape(f"moetrain run report: {run_dir.name}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{title}</h1>\n<p>{html.escape(str(run_dir))}; every row of metrics.jsonl "
        f"(all of the run's processes, across resumes).</p>\n<table>{table}</table>\n"
        f"{body}\n</body></html>\n"
    )


def build_report(run_dir: Path) -> Report:
    """Read ``run_dir/metrics.jsonl`` and write ``report.html`` and (MoE models)
    ``expert_load.png`` there; returns their paths. Raises FileNotFoundError without
    metrics.jsonl."""
    rows = history.read_history(run_dir)
    load = plots.expert_load_png(rows)
    figures = [("Loss", plots.loss_png(rows)), ("Throughput", plots.throughput_png(rows))]
    if load is not None:
        figures.append(("Expert load per MoE layer", load))
    figures.append(("Drops and dead experts", plots.drops_png(rows)))
    load_path = None
    if load is not None:
        load_path = run_dir / "expert_load.png"
        load_path.write_bytes(load)
    out = run_dir / "report.html"
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(render_html(run_dir, rows, figures))
    tmp.replace(out)
    return Report(out, load_path)
