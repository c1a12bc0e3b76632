"""The loop's record: series, segments, the table and the PNG timeline; and `lookalike metrics --plot`."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from control.timeline import (
    Mark,
    failed,
    plot_timeline,
    precision_series,
    rate_series,
    render_table,
    segment_row,
    segments,
)
from feedback.plots import panel_points, plot_series, with_gaps
from feedback.report import render_table as metrics_table
from producers.shoppers import QueryRecord

T0 = 1_000_000.0


def rec(at: float, version: str | None = "A", status: str = "ok", p5: float | None = 0.6, latency: float = 0.1,
        kind: str = "photo") -> QueryRecord:
    return QueryRecord(T0 + at, latency, status, kind, version, p5 if status == "ok" else None)


RECORDS = [rec(1, p5=0.4), rec(2, p5=0.8), rec(11), rec(12, status="timeout", version=None),
           rec(21, "B", p5=1.0), rec(22, "A", p5=0.2), rec(23, "B", p5=0.8, kind="more_like_this"), rec(31, "A")]


def test_rate_and_precision_series_per_version() -> None:
    rates = rate_series(RECORDS, T0, 10)
    assert rates["A"] == ([5 / 60, 15 / 60, 25 / 60, 35 / 60], [0.2, 0.1, 0.1, 0.1])
    assert rates["B"] == ([25 / 60], [0.2])  # the timeout counts for nobody
    # the run stopped 4 s into the last bin: its one reply is 1 / 4 s, not 1 / 10 s
    assert rate_series(RECORDS, T0, 10, end=T0 + 34)["A"][1] == pytest.approx([0.2, 0.1, 0.1, 0.25])
    p5 = precision_series(RECORDS, T0, 10)
    assert p5["A"][1] == pytest.approx([0.6, 0.6, 0.2, 0.6])
    assert p5["B"][1] == pytest.approx([1.0])  # "more like this" queries have no photo to judge by


def test_segments_split_at_switches_and_count_failures() -> None:
    segs = segments(RECORDS, [(T0 + 20, "B"), (T0 + 30, "A")], "A", T0, T0 + 40)
    assert [(s.version, s.start - T0, s.end - T0, len(s.records)) for s in segs] == [
        ("A", 0, 20, 4), ("B", 20, 30, 3), ("A", 30, 40, 1)]
    row = segment_row(segs[0], T0, {"ctr_at_5": 0.25, "purchase_rate": 0.01, "impressions": 40})
    assert row["queries"] == 4 and row["failed"] == 1 and row["qps"] == pytest.approx(3 / 20)
    assert row["p_at_5"] == pytest.approx(0.6) and row["ctr_at_5"] == 0.25
    mixed = segment_row(segs[1], T0, None)
    assert mixed["answered_by"] == ["A", "B"] and mixed["ctr_at_5"] is None  # the grace period: old-model queries
    assert len(failed(RECORDS)) == 1 and failed(RECORDS, T0 + 13) == [] and len(failed(RECORDS, T0, T0 + 12)) == 1


def test_table_lists_rows_marks_and_failures() -> None:
    segs = segments(RECORDS, [(T0 + 20, "B")], "A", T0, T0 + 40)
    rows = [segment_row(s, T0, None) for s in segs]
    marks = [Mark(T0 + 18, "gate", "gate accepted: P@5 0.8 beats 0.7"), Mark(T0 + 6, "trigger", "trigger: 150 events")]
    table = render_table(rows, marks, T0, failed_during_switch=0, failed_total=1, wall_s=600)
    lines = table.splitlines()
    assert lines[2].startswith("A ") and lines[3].startswith("B ")
    assert table.index("trigger: 150") < table.index("gate accepted")  # marks in time order
    assert "failed queries during the switches: 0; in the whole run: 1" in table
    assert "wall time from the start to this table: 10.0 min" in table


def test_plot_timeline_writes_a_png(tmp_path: Path) -> None:
    series = {"A": [{"t": T0, "ctr_at_5": 0.1}, {"t": T0 + 10, "ctr_at_5": None}], "B": [{"t": T0 + 20, "ctr_at_5": 0.3}]}
    path = plot_timeline(RECORDS, series, [Mark(T0 + 20, "switch", "switch to B")], T0, tmp_path / "t" / "loop.png",
                         bin_s=10, end=T0 + 40)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 500


def test_lines_break_where_a_version_had_no_data() -> None:
    xs, ys = with_gaps([0, 10, 20, 60, 70], [1, 2, 3, 4, 5], 10)
    assert xs == [0, 10, 20, 40, 60, 70]
    assert ys[:3] == [1, 2, 3] and ys[3] != ys[3] and ys[4:] == [4, 5]  # NaN between 20 and 60
    assert with_gaps([0, 10], [1, 2], 10) == ([0, 10], [1, 2])


def test_metrics_plot_points_and_png(tmp_path: Path) -> None:
    rows = [{"t": 600, "replies": 30, "ctr_at_5": None, "drift": 0.1}, {"t": 660, "replies": 60, "ctr_at_5": 0.2}]
    assert panel_points(rows, "replies", 60, "per_s") == ([600.0, 660.0], [0.5, 1.0])
    assert panel_points(rows, "ctr_at_5", 60) == ([660.0], [0.2])
    assert panel_points(rows, "drift", 60) == ([600.0], [0.1])
    path = plot_series({"v1": rows, "v2": rows[1:]}, tmp_path / "m.png", 60)
    with Image.open(path) as img:
        assert img.format == "PNG"


def test_metrics_table_has_drift_per_version() -> None:
    metrics = {"replies": 3, "events": 20, "impressions": 15, "clicks": 1, "ctr_at_5": 1 / 15, "add_to_cart_rate": 0.0,
               "purchase_rate": 0.0, "dismiss_rate": 0.0, "mean_click_rank": 2.0, "coverage": None}
    report = {"models": {"old": {**metrics, "drift": 0.25}, "new": {**metrics, "drift": None}}, "window_minutes": None,
              "bucket_s": 60, "catalog_items": None, "totals": {}, "last_training": {}, "trigger_pending": None,
              "trainer_lease": None}
    lines = metrics_table(report).splitlines()
    assert lines[0].split()[-1] == "drift"
    assert lines[1].split()[-1] == "0.2500" and lines[2].split()[-1] == "-"
    assert lines[1].split()[5] == "0.067"  # CTR@5
