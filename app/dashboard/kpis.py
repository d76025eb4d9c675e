"""The KPI page (/ops/kpis, every viewer): the brief's KPIs as inline SVG charts with their
numbers beside them and the targets drawn as reference lines; incidents by severity over 24 h
and 7 days; time to approval; the decisions' confidence distribution; calibration for the
decision service and the fallback separately. Read from app/incidents/queries.py (the ops
API's GET /api/ops/kpis is its `kpis`), drawn by charts.py. The window is `?days=`."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response
from markupsafe import Markup

from app.dashboard import charts
from app.dashboard.charts import TARGETS, Formatter, duration, percent
from app.dashboard.web import render, signed_in
from app.incidents import queries
from app.incidents.schemas import Calibration, CalibrationSeries, KpiSeries, SeveritySeries
from app.services import transaction

router = APIRouter(prefix="/ops", include_in_schema=False)

DAY_CHOICES = (1, 7, 14, 30, 90)
DEFAULT_DAYS = 7
# The per-day trend charts draw bars: at most a month of them.
MAX_TREND_DAYS = 31
REFRESH_S = 60
SOURCE_NAMES = {"sira": "decision service (sira)", "fallback": "fallback (local rules)"}


@dataclass(frozen=True, slots=True)
class KpiRow:
    name: str
    value: str  # formatted, "n/a" without data
    target: str
    verdict: str  # "meets the target", "misses the target", "no data"
    counted: str  # what the number is computed over
    chart: Markup  # the value against its target
    trend: Markup  # per day, with the target line


def inline_svg(svg: str) -> Markup:
    """A chart of charts.py for a template, as is: charts.py escapes every label it writes
    (a tenant or plugin name is input), so its SVG is safe markup."""
    return Markup(svg)  # noqa: S704 (escaped by charts.py)


def _days(raw: str | None) -> int:
    try:
        days = int(raw or DEFAULT_DAYS)
    except ValueError:
        return DEFAULT_DAYS
    return days if days in DAY_CHOICES else DEFAULT_DAYS


def _shown(value: float | None, fmt: Formatter) -> str:
    return "n/a" if value is None else fmt(value)


def _kpi_row(
    name: str,
    key: str,
    value: float | None,
    fmt: Formatter,
    counted: str,
    series: KpiSeries,
) -> KpiRow:
    target = TARGETS["mttr_s" if key == "mttr_loop_s" else key]
    if value is None:
        verdict = "no data"
    else:
        verdict = "meets the target" if target.met_by(value) else "misses the target"
    return KpiRow(
        name=name,
        value=_shown(value, fmt),
        target=target.label,
        verdict=verdict,
        counted=counted,
        chart=inline_svg(
            charts.kpi_chart(
                name, value, target, fmt=fmt, ceiling=100.0 if key.endswith("_rate") else None
            )
        ),
        trend=inline_svg(charts.kpi_trend_chart(f"{name} per day", series, key)),  # type: ignore[arg-type]
    )


def _severity_totals(series: SeveritySeries) -> list[tuple[str, int]]:
    severities = ("critical", "high", "medium", "low")
    return [(s, sum(p.counts.get(s, 0) for p in series.points)) for s in severities]


@router.get("/kpis")
async def kpi_page(request: Request) -> Response:
    who = await signed_in(request)
    days = _days(request.query_params.get("days"))
    trend_days = min(max(days, 7), MAX_TREND_DAYS)
    async with transaction(request) as session:
        # A tenant-scoped user's KPIs count their tenants only.
        scope = who.user.scope
        kpis = await queries.kpis(session, days=days, tenants=scope)
        series = await queries.kpi_series(session, days=trend_days, tenants=scope)
        hourly = await queries.severity_series(session, bucket="hour", count=24, tenants=scope)
        daily = await queries.severity_series(session, bucket="day", count=7, tenants=scope)
        approval = await queries.time_to_approval(session, days=days, tenants=scope)
        confidence = await queries.confidence_distribution(session, days=days, tenants=scope)
        calibration = await queries.calibration(session, days=days, tenants=scope)
    attempts = f"{kpis['attempts']} attempts executed in the window"
    rows = [
        _kpi_row(
            "Autopatch success rate",
            "success_rate",
            kpis["success_rate"],
            percent,
            attempts,
            series,
        ),
        _kpi_row(
            "Rollback rate", "rollback_rate", kpis["rollback_rate"], percent, attempts, series
        ),
        _kpi_row(
            "MTTD (first bad signal to detection)",
            "mttd_s",
            kpis["mttd_s"],
            duration,
            f"{kpis['incidents']} incidents detected in the window",
            series,
        ),
        _kpi_row(
            "MTTR of the loop (detection to closed)",
            "mttr_loop_s",
            kpis["mttr_loop_s"],
            duration,
            f"only the {kpis['loop_closed_incidents']} incidents the loop healed (resolved with"
            " a successful attempt) or rolled back; incidents resolved by hand, by recovery"
            " alone or ignored are left out. Over every closed incident:"
            f" {_shown(kpis['mttr_s'], duration)}",
            series,
        ),
    ]
    approval_chart = charts.bar_chart(
        "Time to approval",
        [
            ("first vote, mean", approval.first_vote_mean_s),
            ("first vote, median", approval.first_vote_median_s),
            ("quorum, mean", approval.quorum_mean_s),
            ("quorum, median", approval.quorum_median_s),
        ]
        if approval.incidents
        else [],
        fmt=duration,
    )
    calibrations = [
        (
            SOURCE_NAMES.get(s.source, s.source),
            inline_svg(
                charts.calibration_of(
                    f"Calibration: {SOURCE_NAMES.get(s.source, s.source)}", _only(s)
                )
            ),
            [b for b in s.buckets if b.attempts],
        )
        for s in calibration.series
    ]
    return await render(
        request,
        "kpis.html",
        who,
        {
            "days": days,
            "day_choices": DAY_CHOICES,
            "trend_days": trend_days,
            "kpis": kpis,
            "rows": rows,
            "hourly_chart": inline_svg(
                charts.severity_chart("Incidents per hour, last 24 h", hourly)
            ),
            "hourly_totals": _severity_totals(hourly),
            "daily_chart": inline_svg(
                charts.severity_chart("Incidents per day, last 7 days", daily)
            ),
            "daily_totals": _severity_totals(daily),
            "approval": approval,
            "approval_chart": inline_svg(approval_chart),
            "approval_numbers": {
                name: _shown(value, duration)
                for name, value in (
                    ("first_mean", approval.first_vote_mean_s),
                    ("first_median", approval.first_vote_median_s),
                    ("quorum_mean", approval.quorum_mean_s),
                    ("quorum_median", approval.quorum_median_s),
                )
            },
            "confidence": confidence,
            "confidence_chart": inline_svg(
                charts.confidence_chart("Decision confidence", confidence)
            ),
            "calibrations": calibrations,
            "refresh_url": f"/ops/kpis?days={days}&refresh=1",
            "refresh_s": REFRESH_S,
        },
    )


def _only(series: CalibrationSeries) -> Calibration:
    return Calibration(series=[series])
