"""The end-of-run report: rich tables on the terminal, and the JSON file of `--report FILE`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sim.fleet.truth import write_json_atomically


def write_report(report: dict[str, Any], path: Path) -> None:
    write_json_atomically(path, report, sort_keys=False)


def _seconds(figure: dict[str, Any], key: str) -> str:
    value = figure.get(key)
    return "-" if value is None else f"{value:.1f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def render_report(report: dict[str, Any], console: Console) -> None:
    title = f"selfheal simulate: {report.get('scenario')} (run {report.get('run_id')})" + (
        " - interrupted" if report.get("interrupted") else ""
    )
    summary = Table(title=title, show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    drain = report.get("drain", {})
    rows = [
        ("installations / tenants", f"{report['installations']} / {report['tenants']}"),
        ("interval, duration", f"{report['interval_s']:g} s, {report['duration_s']:g} s"),
        (
            "drain after the run",
            f"{drain.get('waited_s', 0):.0f} s of at most {drain.get('bound_s', 0):.0f} s"
            f" ({drain.get('ended', '-')})",
        ),
        (
            "heartbeats",
            f"{report['heartbeats'].get('sent', 0)} sent, {report['heartbeats'].get('failed', 0)} failed",
        ),
        (
            "incidents",
            f"{report['incidents']} ({', '.join(f'{k} {v}' for k, v in report['incidents_by_status'].items()) or 'none'})"
            f"; fleet incidents {report['fleet_incidents']}",
        ),
        ("false incidents", str(report["false_incidents"])),
        ("mismatched incidents", str(report["mismatched_incidents"])),
        ("stale incidents", str(report["stale_incidents"])),
        ("oscillations", str(report["oscillations"])),
        (
            "MTTD (s)",
            f"p50 {_seconds(report['mttd_s'], 'p50')}  p95 {_seconds(report['mttd_s'], 'p95')}"
            f"  max {_seconds(report['mttd_s'], 'max')}  (n={report['mttd_s']['count']})",
        ),
        (
            "MTTR (s)",
            f"p50 {_seconds(report['mttr_s'], 'p50')}  p95 {_seconds(report['mttr_s'], 'p95')}"
            f"  max {_seconds(report['mttr_s'], 'max')}  (n={report['mttr_s']['count']})",
        ),
        ("closed, still sick", str(report["closed_unhealthy"])),
        (
            "autopatch success / rollback",
            f"{_rate(report['autopatch_success_rate'])} / {_rate(report['rollback_rate'])}"
            f" of {report['attempts']['finished']} finished automatic attempts",
        ),
        ("commands refused", str(report["commands_refused"])),
        (
            "decisions",
            ", ".join(f"{k} {v}" for k, v in report["decision_service"]["decisions"].items())
            or "none",
        ),
    ]
    for name, value in rows:
        summary.add_row(name, value)
    console.print(summary)

    faults = Table(title="faults", title_justify="left")
    for column in (
        "kind",
        "injected",
        "detected",
        "healed",
        "expired",
        "still open",
        "MTTD p50",
        "MTTD p95",
        "MTTR p50",
        "MTTR p95",
    ):
        faults.add_column(column, justify="left" if column == "kind" else "right")
    for kind, counts in report["faults"].items():
        timing = report["by_fault_kind"].get(kind, {"mttd_s": {}, "mttr_s": {}})
        faults.add_row(
            kind,
            str(counts.get("injected", 0)),
            str(counts.get("detected", 0)),
            str(counts.get("healed", 0)),
            str(counts.get("expired", 0)),
            str(counts.get("still_open", 0)),
            _seconds(timing["mttd_s"], "p50"),
            _seconds(timing["mttd_s"], "p95"),
            _seconds(timing["mttr_s"], "p50"),
            _seconds(timing["mttr_s"], "p95"),
        )
    console.print(faults)

    if report["bad_releases"]:
        bad = Table(title="bad releases", title_justify="left")
        for column in ("version", "deployed", "by selfheal", "rolled back from", "quarantined"):
            bad.add_column(column)
        for version, info in report["bad_releases"].items():
            bad.add_row(
                version,
                str(info["deployed_by_operators"]),
                str(info["applied_by_selfheal"]),
                str(info["rolled_back_from"]),
                "yes" if info["quarantined"] else "no",
            )
        console.print(bad)

    policy = report.get("policy", {})
    settings = policy.get("values") or {}
    console.print(
        f"policy ({policy.get('note', '')}): "
        + ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items() if k != "updated_at")
    )
    for note in report.get("notes", []):
        console.print(f"note: {note}")
