"""The report's figures as PNG bytes, drawn from ``moetrain.report.history``'s arrays.

matplotlib is imported only here, inside the functions, and only its object-oriented API on an
Agg canvas (``FigureCanvasAgg``): building a report neither imports pyplot nor changes the
process's matplotlib backend.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from moetrain.report import history
from moetrain.report.history import Row

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _figure(rows: int, height: float) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, squeeze=False)
    return fig, [a[0] for a in axes]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _step_axis(ax: Axes, steps: np.ndarray) -> None:
    """x label, whole-step ticks, and a 2-step-wide window around a single step (matplotlib
    refuses a zero-width one)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if steps.size and steps.min() == steps.max():
        ax.set_xlim(float(steps[0]) - 1, float(steps[0]) + 1)


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def loss_png(rows: list[Row]) -> bytes:
    """Training and validation loss over steps."""
    fig, (ax,) = _figure(1, 3.2)
    curves = history.loss_curves(rows)
    labels = {"loss": "train loss", "val_loss": "validation loss"}
    for key, (steps, values) in curves.items():
        if steps.size:
            ax.plot(steps, values, marker="o", markersize=3, label=labels[key])
    all_steps = np.concatenate([s for s, _ in curves.values()])
    if all_steps.size == 0:
        _no_data(ax, "loss")
    else:
        _step_axis(ax, all_steps)
        ax.set_ylabel("cross-entropy (nats)")
        ax.legend()
        ax.grid(alpha=0.3)
    return _png(fig)


def throughput_png(rows: list[Row]) -> bytes:
    """Tokens per second over steps."""
    fig, (ax,) = _figure(1, 2.6)
    steps, tps = history.throughput(rows)
    if steps.size == 0:
        _no_data(ax, "throughput")
    else:
        ax.plot(steps, tps, marker="o", markersize=3, color="tab:green")
        _step_axis(ax, steps)
        ax.set_ylabel("tokens / s")
        ax.grid(alpha=0.3)
    return _png(fig)


def expert_load_png(rows: list[Row]) -> bytes | None:
    """One panel per MoE layer, expert (y) by step (x), coloured by the expert's share of the
    layer's assignments on one scale for all layers, centred on the balanced share 1/E (marked
    on the colour bar). None for a dense model."""
    from matplotlib.colors import TwoSlopeNorm

    steps, shares = history.expert_load(rows)
    num_layers, _, num_experts = shares.shape
    if num_layers == 0 or num_experts == 0:
        return None
    fig, axes = _figure(num_layers, 1.6 * num_layers + 1.0)
    balanced = 1.0 / num_experts
    norm = TwoSlopeNorm(vmin=0.0, vcenter=balanced, vmax=max(float(shares.max()), 2 * balanced))
    x_edges = history.step_edges(steps)
    y_edges = np.arange(num_experts + 1) - 0.5
    meshes = [
        ax.pcolormesh(x_edges, y_edges, shares[i].T, cmap="coolwarm", norm=norm)
        for i, ax in enumerate(axes)
    ]
    for i, ax in enumerate(axes):
        ax.set_ylabel(f"MoE layer {i}\nexpert")
        _step_axis(ax, np.array([]))  # the cells' edges set the x range
    bar = fig.colorbar(meshes[0], ax=axes, label="share of assignments")
    bar.ax.axhline(balanced, color="black", linewidth=1.5)
    bar.ax.text(1.6, balanced, " 1/E", va="center", transform=bar.ax.get_yaxis_transform())
    fig.suptitle(f"Expert load ({num_experts} experts; balanced share 1/E = {balanced:.3g})")
    return _png(fig)


def drops_png(rows: list[Row]) -> bytes:
    """Capacity drops (fraction of assignments, all layers) over steps, dead experts per MoE
    layer over steps, and, with capacity dropping, the dropped fraction by sequence position."""
    by_position = history.drops_by_position(rows)
    fig, axes = _figure(3 if by_position.size else 2, 6.0 if by_position.size else 4.4)
    steps, dropped = history.drop_rates(rows)
    if steps.size:
        axes[0].plot(steps, dropped, marker="o", markersize=3, color="tab:red")
        _step_axis(axes[0], steps)
        axes[0].set_ylabel("dropped fraction")
        axes[0].grid(alpha=0.3)
    else:
        _no_data(axes[0], "drop rate")
    dead_steps, dead = history.dead_experts(rows)
    if dead.shape[0]:
        for i, counts in enumerate(dead):
            axes[1].plot(dead_steps, counts, marker="o", markersize=3, label=f"MoE layer {i}")
        _step_axis(axes[1], dead_steps)
        axes[1].set_ylabel("dead experts")
        axes[1].legend(fontsize="small", ncols=min(4, dead.shape[0]))
        axes[1].grid(alpha=0.3)
    else:
        _no_data(axes[1], "MoE layer")
    if by_position.size:
        spans = np.arange(by_position.size)
        axes[2].bar(spans, by_position, color="tab:orange")
        axes[2].set_xlabel("sequence position span (start -> end), mean over logged steps")
        axes[2].set_ylabel("dropped fraction")
    return _png(fig)
