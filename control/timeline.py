"""The loop run's record, pure: shopper queries and marked moments -> series, a table, a PNG timeline.

Inputs are plain data: the shoppers' :class:`producers.shoppers.QueryRecord` list (what
each query got, as the shopper saw it), the aggregator's per-version buckets
(:func:`feedback.report.metrics_series`) and :class:`Mark` moments (trigger, gate,
switches, rollback). Nothing here talks to Kafka or Redis.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedback.plots import with_gaps
from lookalike.figures import save_figure
from producers.shoppers import QueryRecord

MIN_IMPRESSIONS = 50  # a CTR@5 point needs this many impressions in its bucket (the last, partial one often has few)

MARK_STYLE = {  # kind -> (colour, line style)
    "trigger": ("tab:orange", "--"),
    "gate": ("tab:green", "-"),
    "refused": ("tab:red", "-"),
    "rollout": ("tab:gray", ":"),
    "switch": ("tab:blue", "-"),
    "rollback": ("tab:purple", "--"),
}


@dataclass(frozen=True)
class Mark:
    at: float  # seconds since the epoch
    kind: str  # a key of MARK_STYLE
    label: str


@dataclass
class Segment:
    """A stretch of the run with one serving model version (between switches)."""

    version: str
    start: float
    end: float
    records: list[QueryRecord] = field(default_factory=list)


def binned(records: Sequence[QueryRecord], t0: float, bin_s: float) -> dict[str, dict[int, list[QueryRecord]]]:
    """ok records by the model version that answered, then by bin index ((sent_at - t0) // bin_s)."""
    out: dict[str, dict[int, list[QueryRecord]]] = {}
    for r in records:
        if r.status == "ok" and r.model_version:
            out.setdefault(r.model_version, {}).setdefault(int((r.sent_at - t0) // bin_s), []).append(r)
    return out


def rate_series(records: Sequence[QueryRecord], t0: float, bin_s: float, end: float | None = None
                ) -> dict[str, tuple[list[float], list[float]]]:
    """Per version: (bin middle in minutes since t0, ok replies per second in the bin). With ``end``
    (when the run stopped), the last bin's rate is over the part of it that was run."""
    out = {}
    for version, bins in binned(records, t0, bin_s).items():
        xs, ys = [], []
        for b in sorted(bins):
            span = bin_s if end is None else min(bin_s, end - (t0 + b * bin_s))
            xs.append((b + 0.5) * bin_s / 60)
            ys.append(len(bins[b]) / max(span, 1e-9))
        out[version] = (xs, ys)
    return out


def precision_series(records: Sequence[QueryRecord], t0: float, bin_s: float
                     ) -> dict[str, tuple[list[float], list[float]]]:
    """Per version: (bin middle in minutes, mean P@5 of the bin's photo queries that have one)."""
    out = {}
    for version, bins in binned(records, t0, bin_s).items():
        xs, ys = [], []
        for b in sorted(bins):
            values = [r.precision_at_5 for r in bins[b] if r.precision_at_5 is not None and r.kind == "photo"]
            if values:
                xs.append((b + 0.5) * bin_s / 60)
                ys.append(sum(values) / len(values))
        out[version] = (xs, ys)
    return out


def segments(records: Sequence[QueryRecord], switches: Sequence[tuple[float, str]], first_version: str,
             start: float, end: float) -> list[Segment]:
    """Split [start, end) at each switch (moment, the version serving after it); records go to the
    segment in which they were sent, whichever version answered them."""
    cuts = [(start, first_version), *sorted(switches)]
    out = [Segment(version, at, cuts[i + 1][0] if i + 1 < len(cuts) else end) for i, (at, version) in enumerate(cuts)]
    for r in sorted(records, key=lambda r: r.sent_at):
        for seg in out:
            if seg.start <= r.sent_at < seg.end:
                seg.records.append(r)
                break
    return out


def failed(records: Sequence[QueryRecord], start: float | None = None, end: float | None = None) -> list[QueryRecord]:
    """Queries that got no ok reply (an error reply or none in time), sent within [start, end]."""
    return [r for r in records if r.status != "ok" and (start is None or r.sent_at >= start)
            and (end is None or r.sent_at <= end)]


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def segment_row(seg: Segment, t0: float, feedback: Mapping[str, Any] | None) -> dict[str, Any]:
    """One table row: the shoppers' view of a segment, and the aggregator's metrics for its version."""
    ok = [r for r in seg.records if r.status == "ok"]
    p5 = [r.precision_at_5 for r in ok if r.precision_at_5 is not None and r.kind == "photo"]
    span = max(seg.end - seg.start, 1e-9)
    feedback = feedback or {}
    return {
        "version": seg.version,
        "from_min": (seg.start - t0) / 60,
        "to_min": (seg.end - t0) / 60,
        "queries": len(seg.records),
        "failed": len(seg.records) - len(ok),
        "qps": len(ok) / span,
        "answered_by": sorted({r.model_version for r in ok if r.model_version}),
        "p_at_5": statistics.fmean(p5) if p5 else None,
        "ctr_at_5": feedback.get("ctr_at_5"),
        "purchase_rate": feedback.get("purchase_rate"),
        "impressions": feedback.get("impressions"),
        "latency_p50_ms": None if not ok else 1000 * percentile([r.latency_s for r in ok], 0.5),
        "latency_p95_ms": None if not ok else 1000 * percentile([r.latency_s for r in ok], 0.95),
    }


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def render_table(rows: Sequence[Mapping[str, Any]], marks: Sequence[Mark], t0: float,
                 failed_during_switch: int, failed_total: int, wall_s: float) -> str:
    """The loop's table for people: one row per serving segment, then the marked moments."""
    head = (f"{'serving model':28} {'min':>11} {'queries':>7} {'failed':>6} {'q/s':>5} {'P@5':>6} {'CTR@5':>6} "
            f"{'purch.':>6} {'impr.':>6} {'p50 ms':>7} {'p95 ms':>7}")
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row['version']:28} {row['from_min']:5.1f}-{row['to_min']:<5.1f} {row['queries']:>7} {row['failed']:>6} "
            f"{row['qps']:5.2f} {_cell(row['p_at_5'], '{:.3f}'):>6} {_cell(row['ctr_at_5'], '{:.3f}'):>6} "
            f"{_cell(row['purchase_rate'], '{:.3f}'):>6} {_cell(row['impressions'], '{}'):>6} "
            f"{_cell(row['latency_p50_ms'], '{:.0f}'):>7} {_cell(row['latency_p95_ms'], '{:.0f}'):>7}")
    lines.append("")
    for mark in sorted(marks, key=lambda m: m.at):
        lines.append(f"  {(mark.at - t0) / 60:5.2f} min  {mark.kind:8} {mark.label}")
    lines.append("")
    lines.append(f"failed queries during the switches: {failed_during_switch}; in the whole run: {failed_total}")
    lines.append(f"wall time from the start to this table: {wall_s / 60:.1f} min")
    return "\n".join(lines)


def plot_timeline(records: Sequence[QueryRecord], series: Mapping[str, Sequence[Mapping[str, Any]]],
                  marks: Sequence[Mark], t0: float, path: Path, bin_s: float = 15.0, title: str = "",
                  end: float | None = None, bucket_s: float = 10.0) -> Path:
    """Three panels against minutes since ``t0``: ok queries/s, CTR@5 (the aggregator's buckets with at
    least :data:`MIN_IMPRESSIONS` impressions) and P@5 (the shoppers' view), one line per model version,
    broken where the version did not answer; failed queries as red crosses; marks as numbered vertical
    lines, their labels listed under the panels."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib import pyplot as plt

    marks = sorted(marks, key=lambda m: m.at)
    fig, axes = plt.subplots(3, 1, figsize=(11, 9 + 0.22 * len(marks)), sharex=True,
                             gridspec_kw={"bottom": 0.1 + 0.025 * len(marks), "top": 0.92, "hspace": 0.08})
    versions = sorted({r.model_version for r in records if r.model_version} | set(series),
                      key=lambda v: min([r.sent_at for r in records if r.model_version == v] or [float("inf")]))
    colours = {v: f"C{i}" for i, v in enumerate(versions)}
    step = bin_s / 60
    try:
        rate_ax, ctr_ax, p5_ax = axes
        for version, (xs, ys) in rate_series(records, t0, bin_s, end).items():
            rate_ax.plot(*with_gaps(xs, ys, step), "o-", markersize=3, color=colours[version], label=version)
        bad = failed(records)
        rate_ax.plot([(r.sent_at - t0) / 60 for r in bad], [0] * len(bad), "x", color="red",
                     label=f"failed queries: {len(bad)}")
        rate_ax.set_ylabel("ok queries / s")
        for version, rows in series.items():
            pts = [((row["t"] - t0) / 60, row["ctr_at_5"]) for row in rows
                   if row.get("ctr_at_5") is not None and (row.get("impressions") or 0) >= MIN_IMPRESSIONS]
            if pts:
                xs, ys = with_gaps([x for x, _ in pts], [y for _, y in pts], bucket_s / 60)
                ctr_ax.plot(xs, ys, "o-", markersize=3, color=colours.get(version), label=version)
        ctr_ax.set_ylabel(f"CTR@5 (aggregator,\n{bucket_s:g} s buckets)")
        for version, (xs, ys) in precision_series(records, t0, bin_s).items():
            p5_ax.plot(*with_gaps(xs, ys, step), "o-", markersize=3, color=colours[version], label=version)
        p5_ax.set_ylabel(f"P@5 (shoppers' view,\n{bin_s:g} s bins)")
        p5_ax.set_xlabel("minutes since the shoppers started")
        for ax in axes:
            ax.grid(alpha=0.3)
            for mark in marks:
                colour, style = MARK_STYLE.get(mark.kind, ("black", ":"))
                ax.axvline((mark.at - t0) / 60, color=colour, linestyle=style, linewidth=1.2)
        for i, mark in enumerate(marks, start=1):
            colour, _ = MARK_STYLE.get(mark.kind, ("black", ":"))
            rate_ax.annotate(str(i), ((mark.at - t0) / 60, 1.0), xycoords=("data", "axes fraction"),
                             xytext=(2, 2 + 9 * (i % 2)), textcoords="offset points", fontsize=8, color=colour)
            fig.text(0.06, 0.02 + 0.025 * (len(marks) - i), f"{i}. {(mark.at - t0) / 60:4.2f} min  {mark.label}",
                     fontsize=8, color=colour, family="monospace")
        rate_ax.legend(loc="lower left", fontsize=8, title="model version")
        fig.suptitle(title or "the feedback loop")
        path = save_figure(fig, path)
    finally:
        plt.close(fig)
    return path
