"""The dashboard's inline SVG charts (app/dashboard/charts.py): well-formed XML, accessible
(a title and an aria-label), their numbers written as text, the targets drawn as reference
lines, labels escaped, and "no data yet" instead of empty axes."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest

from app.dashboard import charts
from app.dashboard.charts import TARGETS, CalibrationPoint, Target
from app.incidents.schemas import (
    Calibration,
    CalibrationBucket,
    CalibrationSeries,
    ConfidenceBucket,
    ConfidenceDistribution,
    KpiPoint,
    KpiSeries,
    SeverityPoint,
    SeveritySeries,
)
from app.plugins.queries import HeartbeatPoint

pytestmark = pytest.mark.no_services

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert root.get("role") == "img"
    return root


def texts(root: ET.Element) -> list[str]:
    """The text drawn on the chart (not the title/desc/tooltips)."""
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def title_of(root: ET.Element) -> str:
    title = root.find(f"{SVG}title")
    assert title is not None
    return title.text or ""


def reference_lines(root: ET.Element) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == "target"]


def test_bar_chart_writes_its_numbers_and_the_target_line():
    svg = charts.bar_chart(
        "Autopatch success",
        [("Mon", 97.5), ("Tue", 90.0), ("Wed", None)],
        fmt=charts.percent,
        targets=[TARGETS["success_rate"]],
    )
    root = parse(svg)
    assert title_of(root) == "Autopatch success" == root.get("aria-label")
    drawn = texts(root)
    assert "97.5 %" in drawn and "90 %" in drawn
    assert "n/a" in drawn  # a missing value is not drawn as 0
    (target,) = reference_lines(root)
    line = target.find(f"{SVG}line")
    assert line is not None and line.get("y1") == line.get("y2")  # horizontal
    assert "".join(target.itertext()) == "target > 95 %"
    desc = root.find(f"{SVG}desc")
    assert desc is not None and "Mon: 97.5 %" in (desc.text or "")


def test_target_line_sits_at_its_value():
    svg = charts.bar_chart(
        "Rollback rate", [("d1", 1.0), ("d2", 4.0)], targets=[TARGETS["rollback_rate"]]
    )
    root = parse(svg)
    (target,) = reference_lines(root)
    line = target.find(f"{SVG}line")
    assert line is not None
    # The y axis runs 0..5 (the nice top above 4): 2 % is 60 % of the way up the plot.
    plot_top, plot_bottom = charts._TOP, charts.HEIGHT - charts._BOTTOM
    expected = plot_bottom - (plot_bottom - plot_top) * 2 / 5
    assert float(line.get("y1") or 0) == pytest.approx(expected, abs=0.1)


def test_labels_are_escaped():
    evil = '<script>alert("x")</script> & co'
    for svg in (
        charts.bar_chart(evil, [(evil, 3.0)]),
        charts.line_chart(evil, [evil, "b"], {evil: [1.0, 2.0]}),
        charts.stacked_bar_chart(evil, [evil], {evil: [2]}),
        charts.calibration_chart(evil, {evil: [CalibrationPoint(0.5, 0.5, 2)]}),
        charts.kpi_chart(evil, 3.0, Target(evil, 2.0, "max")),
        charts.no_data(evil),
    ):
        assert "<script>" not in svg
        root = parse(svg)  # still well-formed
        assert title_of(root) == evil  # the reader gets the text back, unharmed
        assert evil in texts(root)


def test_empty_data_says_no_data_yet():
    for svg in (
        charts.bar_chart("Success", []),
        charts.bar_chart("Success", [("Mon", None)]),
        charts.line_chart("Heartbeats", [], {}),
        charts.stacked_bar_chart("Incidents", ["00:00", "01:00"], {"high": [0, 0]}),
        charts.histogram("Confidence", [(0.0, 0.1, 0), (0.1, 0.2, 0)]),
        charts.calibration_chart("Calibration", {"sira": [], "fallback": []}),
        charts.kpi_chart("MTTR", None, TARGETS["mttr_s"]),
    ):
        root = parse(svg)
        assert texts(root)[-1] == "no data yet"
        assert not list(root.iter(f"{SVG}rect"))  # no empty axes or bars


def test_line_chart_breaks_on_missing_values_and_names_each_series():
    root = parse(
        charts.line_chart(
            "Heartbeats",
            ["a", "b", "c", "d"],
            {"requests": [10, 12, None, 8], "errors": [1, 0, 2, 3]},
        )
    )
    lines = list(root.iter(f"{SVG}polyline"))
    assert len(lines) == 2  # requests: one run (a, b) and one lone point (d); errors: one run
    assert len(list(root.iter(f"{SVG}circle"))) == 1
    drawn = texts(root)
    assert "requests: 8" in drawn and "errors: 3" in drawn  # the legend: the last values


def test_histogram_of_a_confidence_distribution():
    distribution = ConfidenceDistribution(
        total=5,
        without_confidence=1,
        buckets=[
            ConfidenceBucket(lower=k / 10, upper=(k + 1) / 10, count=n, by_source={}, by_action={})
            for k, n in enumerate([0, 0, 0, 0, 0, 0, 0, 1, 3, 1])
        ],
    )
    root = parse(charts.confidence_chart("Decision confidence", distribution))
    drawn = texts(root)
    assert "3" in drawn and "0.8-0.9" in drawn
    assert len([r for r in root.iter(f"{SVG}rect")]) == 3  # only the buckets with decisions


def test_calibration_chart_has_the_diagonal_and_one_series_per_source():
    calibration = Calibration(
        series=[
            CalibrationSeries(
                source="sira",
                buckets=[
                    CalibrationBucket(
                        lower=0.8, upper=0.9, attempts=4, successes=3, predicted=0.85, actual=0.75
                    ),
                    CalibrationBucket(
                        lower=0.9, upper=1.0, attempts=2, successes=2, predicted=0.95, actual=1.0
                    ),
                ],
            ),
            CalibrationSeries(
                source="fallback",
                buckets=[
                    CalibrationBucket(
                        lower=0.5, upper=0.6, attempts=1, successes=0, predicted=0.5, actual=0.0
                    ),
                    CalibrationBucket(
                        lower=0.6, upper=0.7, attempts=0, successes=0, predicted=None, actual=None
                    ),
                ],
            ),
        ]
    )
    root = parse(charts.calibration_of("Calibration", calibration))
    (diagonal,) = reference_lines(root)
    line = diagonal.find(f"{SVG}line")
    assert line is not None
    # From (0, 0) bottom left to (1, 1) top right.
    assert float(line.get("x1") or 0) < float(line.get("x2") or 0)
    assert float(line.get("y1") or 0) > float(line.get("y2") or 0)
    assert "perfect calibration" in "".join(diagonal.itertext())
    drawn = texts(root)
    assert "75 % n=4" in drawn and "100 % n=2" in drawn and "0 % n=1" in drawn
    assert {"sira", "fallback"} <= set(drawn)
    assert len(list(root.iter(f"{SVG}circle"))) == 3  # the empty bucket is not a point
    desc = root.find(f"{SVG}desc")
    assert desc is not None and "sira: predicted 0.85 actual 75 % (n=4)" in (desc.text or "")


def test_severity_chart_stacks_severities_and_writes_totals():
    start = datetime(2026, 12, 5, 10, tzinfo=UTC)
    series = SeveritySeries(
        bucket="hour",
        points=[
            SeverityPoint(
                start=start + timedelta(hours=h),
                counts={"low": h, "medium": 0, "high": 1, "critical": 0},
                total=h + 1,
            )
            for h in range(3)
        ],
    )
    root = parse(charts.severity_chart("Incidents, 24 h", series))
    drawn = texts(root)
    assert ["1", "2", "3"] == [t for t in drawn if t in ("1", "2", "3")]  # the totals
    assert "10:00" in drawn
    assert "high 3" in drawn and "low 3" in drawn  # the legend with each severity's total


def test_kpi_chart_says_whether_the_target_is_met():
    met = parse(charts.kpi_chart("MTTD", 45.0, TARGETS["mttd_s"], fmt=charts.duration))
    assert "45 s (meets the target)" in texts(met)
    assert "target < 2 min" in "".join(reference_lines(met)[0].itertext())
    missed = parse(charts.kpi_chart("Success", 90.0, TARGETS["success_rate"], fmt=charts.percent))
    assert "90 % (misses the target)" in texts(missed)


def test_kpi_trend_chart_draws_the_target_for_each_kpi():
    day = datetime(2026, 12, 1, tzinfo=UTC)
    series = KpiSeries(
        points=[
            KpiPoint(
                start=day + timedelta(days=k),
                attempts=k,
                success_rate=None if k == 0 else 96.0,
                rollback_rate=None if k == 0 else 1.5,
                mttd_s=None if k == 0 else 90.0,
                mttr_loop_s=None if k == 0 else 660.0,
            )
            for k in range(3)
        ]
    )
    for kpi, value, target in (
        ("success_rate", "96 %", "target > 95 %"),
        ("rollback_rate", "1.5 %", "target < 2 %"),
        ("mttd_s", "90 s", "target < 2 min"),
        ("mttr_loop_s", "11 min", "target < 10 min"),
    ):
        root = parse(charts.kpi_trend_chart(kpi, series, kpi))
        drawn = texts(root)
        assert drawn.count(value) == 2 and "n/a" in drawn, kpi
        assert "Tue 01" in drawn
        (line,) = reference_lines(root)
        assert "".join(line.itertext()).startswith(target), kpi


def test_heartbeat_chart():
    at = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
    beats = [
        HeartbeatPoint(
            received_at=at + timedelta(minutes=i),
            plugin_version="1.2.2",
            requests=100 + i,
            errors=i,
            webhook_attempts=10,
            webhook_failures=0,
            latency_p95_ms=None,
        )
        for i in range(3)
    ]
    root = parse(charts.heartbeat_chart("Heartbeats", beats))
    assert "requests: 102" in texts(root)
    assert "no data yet" in texts(parse(charts.heartbeat_chart("Heartbeats", [])))


def test_formats():
    assert charts.number(1234) == "1234"
    assert charts.number(97.456) == "97.5"
    assert charts.number(0.857) == "0.86"
    assert charts.duration(45) == "45 s"
    assert charts.duration(150) == "2.5 min"
    assert charts.duration(7200) == "2 h"
    assert charts.percent(2) == "2 %"


def test_a_percentage_at_100_fills_its_bar():
    from app.dashboard.charts import TARGETS, kpi_chart, percent

    svg = kpi_chart("success", 100.0, TARGETS["success_rate"], fmt=percent, ceiling=100.0)
    assert "200 %" not in svg  # the scale ends at 100 %, where the bar ends
    assert percent(100.0) in svg
