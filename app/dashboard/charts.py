"""Inline SVG charts for the dashboard's pages, server-rendered: no script, readable with
JavaScript off and printable. Pure functions: data in, an SVG string out, no I/O.

Each chart has a `<title>` and an `aria-label` (what a screen reader says), a `<desc>` with
its numbers in words, and its numbers as text in the drawing (a value on each bar or point),
so nothing is told by colour or shape alone. Every label is escaped (a tenant or plugin name
is input). A chart without data says "no data yet" instead of drawing empty axes.

The primitives take plain data (`bar_chart`, `line_chart`, `stacked_bar_chart`, `histogram`,
`calibration_chart`, `kpi_chart`); `severity_chart`, `kpi_trend_chart`, `confidence_chart`,
`calibration_of` and `heartbeat_chart` draw the read models of app/incidents/queries.py
and app/plugins/queries.py. The brief's targets are `TARGETS`: drawn as horizontal reference
lines (vertical in `kpi_chart`, whose bar is horizontal)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Literal

from app.incidents.schemas import Calibration, ConfidenceDistribution, KpiSeries, SeveritySeries
from app.plugins.queries import HeartbeatPoint

WIDTH = 480
HEIGHT = 200
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 16, 28, 34
# Colour-blind-safe (Okabe-Ito); every series also has its name as text in a legend.
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9")
SEVERITY_COLOURS = {"low": "#56b4e9", "medium": "#e69f00", "high": "#d55e00", "critical": "#7a0019"}
TARGET_COLOUR = "#b00020"
NO_DATA = "no data yet"

Formatter = Callable[[float], str]


@dataclass(frozen=True, slots=True)
class Target:
    """A goal drawn as a horizontal reference line: the value must stay above (`min`) or
    below (`max`) `value`."""

    label: str
    value: float
    kind: Literal["min", "max"]

    def met_by(self, value: float) -> bool:
        return value > self.value if self.kind == "min" else value < self.value


# The brief's targets, in the units of app/incidents/queries.py:kpis (percent, seconds).
TARGETS = {
    "success_rate": Target("target > 95 %", 95.0, "min"),
    "rollback_rate": Target("target < 2 %", 2.0, "max"),
    "mttd_s": Target("target < 2 min", 120.0, "max"),
    "mttr_s": Target("target < 10 min", 600.0, "max"),
}


def number(value: float) -> str:
    """1234 -> "1234", 97.456 -> "97.5", 0.857 -> "0.86"."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    if abs(value) < 1:
        return f"{value:.2f}"
    return f"{value:.1f}"


def percent(value: float) -> str:
    return f"{number(value)} %"


def duration(seconds: float) -> str:
    """45 -> "45 s", 150 -> "2.5 min", 7200 -> "2 h"."""
    if seconds < 120:
        return f"{number(round(seconds, 1))} s"
    if seconds < 7200:
        return f"{number(round(seconds / 60, 1))} min"
    return f"{number(round(seconds / 3600, 1))} h"


def _e(text: str) -> str:
    return escape(text, quote=True)


def _svg(title: str, desc: str, body: list[str], *, width: int, height: int) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img"'
        f' aria-label="{_e(title)}" viewBox="0 0 {width} {height}" width="{width}"'
        f' height="{height}" font-family="sans-serif" font-size="11">'
        f"<title>{_e(title)}</title><desc>{_e(desc)}</desc>"
        f'<text x="4" y="14" font-size="12" font-weight="bold">{_e(title)}</text>'
        + "".join(body)
        + "</svg>"
    )


def no_data(title: str, *, width: int = WIDTH, height: int = HEIGHT) -> str:
    """A chart with nothing to draw: its title and "no data yet"."""
    return _svg(
        title,
        f"{title}: {NO_DATA}",
        [
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#555">'
            f"{NO_DATA}</text>"
        ],
        width=width,
        height=height,
    )


def _nice_max(value: float) -> float:
    """A round top for the y axis, at least `value`."""
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0):
        if step * magnitude >= value:
            return step * magnitude
    return 10.0 * magnitude


@dataclass(frozen=True, slots=True)
class _Frame:
    width: int
    height: int
    top_value: float

    @property
    def plot_w(self) -> float:
        return self.width - _LEFT - _RIGHT

    @property
    def plot_h(self) -> float:
        return self.height - _TOP - _BOTTOM

    def y(self, value: float) -> float:
        return _TOP + self.plot_h * (1 - min(max(value, 0.0), self.top_value) / self.top_value)

    def axes(self, fmt: Formatter) -> list[str]:
        bottom = _TOP + self.plot_h
        return [
            f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{bottom}" stroke="#888"/>',
            f'<line x1="{_LEFT}" y1="{bottom}" x2="{_LEFT + self.plot_w}" y2="{bottom}"'
            ' stroke="#888"/>',
            f'<text x="{_LEFT - 4}" y="{_TOP + 4}" text-anchor="end">'
            f"{_e(fmt(self.top_value))}</text>",
            f'<text x="{_LEFT - 4}" y="{bottom}" text-anchor="end">{_e(fmt(0))}</text>',
        ]

    def targets(self, targets: Sequence[Target]) -> list[str]:
        """Each target as a dashed line across the plot at its value, named in the bottom
        right corner (beside a sample of the line), away from the bars' numbers."""
        out = []
        for i, target in enumerate(targets):
            y = self.y(target.value)
            key_y = self.height - 3 - 13 * i
            right = _LEFT + self.plot_w
            width = 7 * len(target.label)
            out.append(
                f'<g class="target"><line x1="{_LEFT}" y1="{y:.1f}" x2="{right}"'
                f' y2="{y:.1f}" stroke="{TARGET_COLOUR}" stroke-dasharray="6 3"/>'
                f'<line x1="{right - width - 22}" y1="{key_y - 4}" x2="{right - width - 4}"'
                f' y2="{key_y - 4}" stroke="{TARGET_COLOUR}" stroke-dasharray="6 3"/>'
                f'<text x="{right}" y="{key_y}" text-anchor="end" fill="{TARGET_COLOUR}">'
                f"{_e(target.label)}</text></g>"
            )
        return out

    def x_labels(
        self, labels: Sequence[str], centres: Sequence[float], *, most: int = 8
    ) -> list[str]:
        """At most about `most` labels along the x axis (every k-th), the last one always
        (in place of the k-th before it when they would touch)."""
        n = len(labels)
        every = max(1, math.ceil(n / most))
        shown = list(range(0, n, every))
        if shown and shown[-1] != n - 1:
            if n - 1 - shown[-1] < every:
                shown[-1] = n - 1
            else:
                shown.append(n - 1)
        bottom = _TOP + self.plot_h
        size = "" if most <= 8 else ' font-size="9"'
        return [
            f'<text x="{centres[i]:.1f}" y="{bottom + 14}" text-anchor="middle"{size}>'
            f"{_e(labels[i])}</text>"
            for i in shown
        ]


def _legend(names: Sequence[str], colours: Sequence[str], width: int, height: int) -> list[str]:
    out, x = [], float(_LEFT)
    for name, colour in zip(names, colours, strict=True):
        out.append(
            f'<rect x="{x:.1f}" y="{height - 12}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{x + 13:.1f}" y="{height - 3}">{_e(name)}</text>'
        )
        x += 20 + 7 * len(name)
    return out


def _targets_text(targets: Sequence[Target]) -> str:
    return "".join(f"; {t.label}" for t in targets)


def bar_chart(
    title: str,
    points: Sequence[tuple[str, float | None]],
    *,
    fmt: Formatter = number,
    targets: Sequence[Target] = (),
    width: int = WIDTH,
    height: int = HEIGHT,
    most_labels: int = 8,
) -> str:
    """One bar per (label, value), its value written above it; None is "no value" (a gap,
    written "n/a"), not 0. Targets are horizontal reference lines. At most about
    `most_labels` x labels are written (every k-th); more than 8 are written smaller. Meant
    for up to about 31 bars (a month of days); longer series read better as `line_chart`."""
    values = [v for _, v in points if v is not None]
    if not values:
        return no_data(title, width=width, height=height)
    frame = _Frame(width, height, _nice_max(max([*values, *(t.value for t in targets)])))
    slot = frame.plot_w / len(points)
    body = frame.axes(fmt)
    centres = []
    for i, (label, value) in enumerate(points):
        x = _LEFT + slot * i
        centres.append(x + slot / 2)
        text_x = x + slot / 2
        if value is None:
            body.append(
                f'<text x="{text_x:.1f}" y="{_TOP + frame.plot_h - 3}" text-anchor="middle"'
                ' fill="#888">n/a</text>'
            )
            continue
        y = frame.y(value)
        if value > 0:
            body.append(
                f'<rect x="{x + slot * 0.15:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}"'
                f' height="{_TOP + frame.plot_h - y:.1f}" fill="{PALETTE[0]}">'
                f"<title>{_e(label)}: {_e(fmt(value))}</title></rect>"
            )
        body.append(
            f'<text x="{text_x:.1f}" y="{y - 3:.1f}" text-anchor="middle">{_e(fmt(value))}</text>'
        )
    body += frame.x_labels([label for label, _ in points], centres, most=most_labels)
    body += frame.targets(targets)
    desc = ", ".join(f"{label}: {'n/a' if v is None else fmt(v)}" for label, v in points)
    return _svg(title, f"{title}. {desc}{_targets_text(targets)}", body, width=width, height=height)


def line_chart(
    title: str,
    labels: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    fmt: Formatter = number,
    targets: Sequence[Target] = (),
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """One line per named series over the same x `labels`; None breaks a line. Each series'
    last value is written in the legend, its minimum, maximum and last in the description."""
    values = [v for vs in series.values() for v in vs if v is not None]
    if not labels or not values:
        return no_data(title, width=width, height=height)
    frame = _Frame(width, height, _nice_max(max([*values, *(t.value for t in targets)])))
    step = frame.plot_w / max(1, len(labels) - 1)
    xs = [_LEFT + step * i for i in range(len(labels))] if len(labels) > 1 else [_LEFT + 0.0]
    body = frame.axes(fmt)
    described: list[str] = []
    keys: list[str] = []
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
    for (name, vs), colour in zip(series.items(), colours, strict=True):
        segments: list[list[str]] = [[]]
        for x, v in zip(xs, vs, strict=False):
            if v is None:
                segments.append([])
            else:
                segments[-1].append(f"{x:.1f},{frame.y(v):.1f}")
        for segment in segments:
            if len(segment) > 1:
                body.append(
                    f'<polyline fill="none" stroke="{colour}" stroke-width="2"'
                    f' points="{" ".join(segment)}"/>'
                )
            elif segment:
                cx, cy = segment[0].split(",")
                body.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{colour}"/>')
        present = [v for v in vs if v is not None]
        if present:
            last = present[-1]
            keys.append(f"{name}: {fmt(last)}")
            described.append(
                f"{name}: last {fmt(last)}, min {fmt(min(present))}, max {fmt(max(present))}"
            )
        else:
            keys.append(f"{name}: n/a")
            described.append(f"{name}: {NO_DATA}")
    body += frame.x_labels(list(labels), xs)
    body += frame.targets(targets)
    # Each series' last value in the legend, not at the line's end: lines near each other
    # would write their numbers over each other.
    body += _legend(keys, colours, width, height)
    return _svg(
        title,
        f"{title}. {'; '.join(described)}{_targets_text(targets)}",
        body,
        width=width,
        height=height,
    )


def stacked_bar_chart(
    title: str,
    labels: Sequence[str],
    stacks: Mapping[str, Sequence[int]],
    *,
    colours: Mapping[str, str] | None = None,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """One bar per label made of the named stacks (e.g. incidents per hour by severity), the
    total written above each bar and each stack's total in the legend. All zero: no data."""
    totals = [sum(vs[i] for vs in stacks.values()) for i in range(len(labels))]
    if not labels or not any(totals):
        return no_data(title, width=width, height=height)
    frame = _Frame(width, height, _nice_max(max(totals)))
    slot = frame.plot_w / len(labels)
    names = list(stacks)
    fills = [(colours or {}).get(name, PALETTE[i % len(PALETTE)]) for i, name in enumerate(names)]
    body = frame.axes(number)
    for i, label in enumerate(labels):
        x = _LEFT + slot * i
        base = 0
        for name, fill in zip(names, fills, strict=True):
            n = stacks[name][i]
            if n:
                y_top, y_base = frame.y(base + n), frame.y(base)
                body.append(
                    f'<rect x="{x + slot * 0.15:.1f}" y="{y_top:.1f}" width="{slot * 0.7:.1f}"'
                    f' height="{y_base - y_top:.1f}" fill="{fill}">'
                    f"<title>{_e(label)}: {n} {_e(name)}</title></rect>"
                )
                base += n
        if totals[i]:
            body.append(
                f'<text x="{x + slot / 2:.1f}" y="{frame.y(totals[i]) - 3:.1f}"'
                f' text-anchor="middle">{totals[i]}</text>'
            )
    body += frame.x_labels(list(labels), [_LEFT + slot * (i + 0.5) for i in range(len(labels))])
    legend_names = [f"{name} {sum(stacks[name])}" for name in names]
    body += _legend(legend_names, fills, width, height)
    desc = ", ".join(f"{name}: {sum(stacks[name])}" for name in names)
    return _svg(title, f"{title}. Total {sum(totals)}: {desc}", body, width=width, height=height)


def histogram(
    title: str,
    buckets: Sequence[tuple[float, float, int]],
    *,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """A histogram of (lower, upper, count) buckets, e.g. decision confidence by 0.1; each
    count written above its bar, every bucket's range below it."""
    return bar_chart(
        title,
        [(f"{lo:.1f}-{hi:.1f}", n) for lo, hi, n in buckets]
        if any(n for _, _, n in buckets)
        else [],
        width=width,
        height=height,
        most_labels=len(buckets),
    )


@dataclass(frozen=True, slots=True)
class CalibrationPoint:
    predicted: float  # mean confidence of the bucket's attempts (0-1)
    actual: float  # their success rate (0-1)
    attempts: int


def calibration_chart(
    title: str,
    series: Mapping[str, Sequence[CalibrationPoint]],
    *,
    size: int = 360,
) -> str:
    """Predicted confidence (x) against actual success (y), both 0-1, one series per source,
    with the diagonal of a perfectly calibrated decision as reference. Each point's actual
    rate and number of attempts are written beside it. `size` is the width; the plot is
    square."""
    left, top, plot = 40, 28, size - 40 - 72  # room on the right for the labels
    height = top + plot + 40  # the x axis' labels, then the legend
    if not any(series.values()):
        return no_data(title, width=size, height=height)

    def px(v: float) -> float:
        return left + plot * min(max(v, 0.0), 1.0)

    def py(v: float) -> float:
        return top + plot * (1 - min(max(v, 0.0), 1.0))

    body = [
        f'<rect x="{left}" y="{top}" width="{plot}" height="{plot}" fill="none" stroke="#888"/>',
        f'<g class="target"><line x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(1)}"'
        f' stroke="{TARGET_COLOUR}" stroke-dasharray="6 3"/>'
        f'<text x="{px(0.02)}" y="{py(0.97)}" fill="{TARGET_COLOUR}">perfect calibration</text>'
        "</g>",
        f'<text x="{left - 4}" y="{py(1) + 4}" text-anchor="end">100 %</text>',
        f'<text x="{left - 4}" y="{py(0)}" text-anchor="end">0 %</text>',
        f'<text x="{px(0)}" y="{py(0) + 13}" text-anchor="middle">0</text>',
        f'<text x="{px(1)}" y="{py(0) + 13}" text-anchor="middle">1</text>',
        f'<text x="{px(0.5)}" y="{py(0) + 13}" text-anchor="middle">predicted confidence</text>',
    ]
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
    described = []
    for k, ((name, points), colour) in enumerate(zip(series.items(), colours, strict=True)):
        # The first series writes its numbers right of its points, the next one left of
        # them: two sources with close points do not write over each other.
        dx, anchor = (6, "start") if k % 2 == 0 else (-6, "end")
        ordered = sorted(points, key=lambda p: p.predicted)
        if len(ordered) > 1:
            coords = " ".join(f"{px(p.predicted):.1f},{py(p.actual):.1f}" for p in ordered)
            body.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>'
            )
        for p in ordered:
            label = f"{name}: predicted {number(p.predicted)}, actual {percent(p.actual * 100)}"
            body.append(
                f'<circle cx="{px(p.predicted):.1f}" cy="{py(p.actual):.1f}" r="4"'
                f' fill="{colour}"><title>{_e(label)} (n={p.attempts})</title></circle>'
                f'<text x="{px(p.predicted) + dx:.1f}" y="{py(p.actual) + 4:.1f}"'
                f' text-anchor="{anchor}" fill="{colour}">'
                f"{_e(percent(round(p.actual * 100)))} n={p.attempts}</text>"
            )
        described.append(
            f"{name}: "
            + (
                ", ".join(
                    f"predicted {number(p.predicted)} actual {percent(p.actual * 100)}"
                    f" (n={p.attempts})"
                    for p in ordered
                )
                or NO_DATA
            )
        )
    body += _legend(list(series), colours, size, height)
    return _svg(title, f"{title}. {'; '.join(described)}", body, width=size, height=height)


def kpi_chart(
    title: str,
    value: float | None,
    target: Target,
    *,
    fmt: Formatter = number,
    width: int = WIDTH,
    height: int = 70,
    ceiling: float | None = None,
) -> str:
    """One KPI as a horizontal bar on its scale (0 to a round value above the KPI and the
    target, or `ceiling` for a KPI that cannot exceed it, such as a percentage's 100) against
    its target (a vertical reference line); the value and whether it meets the target written
    to the right of the scale."""
    if value is None:
        return no_data(title, width=width, height=height)
    top_value = _nice_max(max(value, target.value) * 1.1)
    if ceiling is not None:
        top_value = min(top_value, ceiling)
    plot = width - _LEFT - 200

    def px(v: float) -> float:
        return _LEFT + plot * min(max(v, 0.0), top_value) / top_value

    verdict = "meets the target" if target.met_by(value) else "misses the target"
    body = [
        f'<rect x="{_LEFT}" y="26" width="{plot}" height="18" fill="#eee"/>',
        f'<rect x="{_LEFT}" y="26" width="{px(value) - _LEFT:.1f}" height="18"'
        f' fill="{PALETTE[0]}"/>',
        f'<text x="{_LEFT + plot + 8}" y="39">{_e(fmt(value))} ({verdict})</text>',
        f'<text x="{_LEFT - 4}" y="39" text-anchor="end">{_e(fmt(0))}</text>',
        f'<text x="{_LEFT + plot}" y="22" text-anchor="end" font-size="9" fill="#555">'
        f"{_e(fmt(top_value))}</text>",
        f'<g class="target"><line x1="{px(target.value):.1f}" y1="20"'
        f' x2="{px(target.value):.1f}" y2="50" stroke="{TARGET_COLOUR}" stroke-dasharray="4 2"/>'
        f'<text x="{px(target.value):.1f}" y="62" text-anchor="middle"'
        f' fill="{TARGET_COLOUR}">{_e(target.label)}</text></g>',
    ]
    return _svg(
        title,
        f"{title}: {fmt(value)}, {verdict} ({target.label})",
        body,
        width=width,
        height=height,
    )


# --- the read models, drawn ------------------------------------------------------------------


def severity_chart(title: str, series: SeveritySeries) -> str:
    """Incidents per hour or day by severity (app/incidents/queries.py:severity_series)."""
    fmt = "%H:00" if series.bucket == "hour" else "%a %d"
    labels = [p.start.strftime(fmt) for p in series.points]
    severities = ("low", "medium", "high", "critical")
    stacks = {s: [p.counts.get(s, 0) for p in series.points] for s in severities}
    return stacked_bar_chart(title, labels, stacks, colours=SEVERITY_COLOURS)


Kpi = Literal["success_rate", "rollback_rate", "mttd_s", "mttr_loop_s"]
_KPI_FORMATS: dict[str, Formatter] = {
    "success_rate": percent,
    "rollback_rate": percent,
    "mttd_s": duration,
    "mttr_loop_s": duration,
}


def kpi_trend_chart(title: str, series: KpiSeries, kpi: Kpi) -> str:
    """One KPI per day (queries.kpi_series) as bars, with its target as a reference line
    (the loop's MTTR against the MTTR target)."""
    target = TARGETS["mttr_s" if kpi == "mttr_loop_s" else kpi]
    return bar_chart(
        title,
        [(p.start.strftime("%a %d"), getattr(p, kpi)) for p in series.points],
        fmt=_KPI_FORMATS[kpi],
        targets=[target],
    )


def confidence_chart(title: str, distribution: ConfidenceDistribution) -> str:
    """The decisions' confidence histogram (queries.confidence_distribution)."""
    return histogram(title, [(b.lower, b.upper, b.count) for b in distribution.buckets])


def calibration_of(title: str, calibration: Calibration) -> str:
    """queries.calibration drawn: the buckets with finished attempts, per source."""
    return calibration_chart(
        title,
        {
            s.source: [
                CalibrationPoint(b.predicted, b.actual, b.attempts)
                for b in s.buckets
                if b.attempts and b.predicted is not None and b.actual is not None
            ]
            for s in calibration.series
        },
    )


HeartbeatCounter = Literal["requests", "errors", "webhook_attempts", "webhook_failures"]


def heartbeat_chart(
    title: str,
    heartbeats: Sequence[HeartbeatPoint],
    counters: Sequence[HeartbeatCounter] = ("requests", "errors", "webhook_failures"),
) -> str:
    """An installation's recent heartbeats (app/plugins/queries.py:installation_detail), one
    line per counter. Errors are small beside requests on one scale: a page can draw
    `("requests",)` and `("errors", "webhook_failures")` as two charts."""
    labels = [h.received_at.strftime("%H:%M") for h in heartbeats]
    return line_chart(
        title,
        labels,
        {c.replace("_", " "): [getattr(h, c) for h in heartbeats] for c in counters},
    )
