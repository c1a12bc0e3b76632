"""``lookalike metrics --plot FILE``: the per-version figures over time, one line per model version."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lookalike.figures import save_figure

# (metric, axis title, scale): replies are drawn per second of their bucket
PANELS = (("replies", "replies / s", "per_s"), ("ctr_at_5", "CTR@5", None), ("purchase_rate", "purchase rate", None),
          ("drift", "drift (1 - cos)", None))


def panel_points(rows: Sequence[Mapping[str, Any]], metric: str, bucket_s: int, scale: str | None = None
                 ) -> tuple[list[float], list[float]]:
    """(bucket start in seconds since the epoch, value) of the buckets where ``metric`` is defined."""
    xs, ys = [], []
    for row in rows:
        value = row.get(metric)
        if value is None:
            continue
        xs.append(float(row["t"]))
        ys.append(float(value) / bucket_s if scale == "per_s" else float(value))
    return xs, ys


def with_gaps(xs: Sequence[float], ys: Sequence[float], step: float) -> tuple[list[float], list[float]]:
    """The points with a NaN wherever consecutive x are more than ``step`` apart, so a line is
    broken where a version had no data (e.g. while another version served) instead of bridging it."""
    out_x: list[float] = []
    out_y: list[float] = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if i and x - xs[i - 1] > step * 1.5:
            out_x.append((x + xs[i - 1]) / 2)
            out_y.append(float("nan"))
        out_x.append(x)
        out_y.append(y)
    return out_x, out_y


def plot_series(series: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, bucket_s: int, title: str = "") -> Path:
    """Draw each panel of :data:`PANELS` with one line per model version into ``path`` (PNG).
    ``series``: :func:`feedback.report.metrics_series`. The x axis is minutes since the first bucket."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib import pyplot as plt

    starts = [row["t"] for rows in series.values() for row in rows]
    t0 = min(starts) if starts else 0
    # the oldest version first, so the first colour is the first champion
    order = sorted(series, key=lambda m: min([row["t"] for row in series[m]] or [float("inf")]))
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(9, 2.3 * len(PANELS)), sharex=True, constrained_layout=True)
    try:
        for ax, (metric, label, scale) in zip(axes, PANELS, strict=True):
            for model in order:
                xs, ys = panel_points(series[model], metric, bucket_s, scale)
                xs, ys = with_gaps(xs, ys, bucket_s)
                ax.plot([(x - t0) / 60 for x in xs], ys, "o-", markersize=3, label=model)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(title="model version", fontsize=8)
        axes[-1].set_xlabel(f"minutes (buckets of {bucket_s} s)")
        fig.suptitle(title or "feedback metrics per model version")
        path = save_figure(fig, path)
    finally:
        plt.close(fig)
    return path
