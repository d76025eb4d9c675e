"""The progress view: a rich Live panel refreshed about once a second on a terminal; a compact
line every 10 s without one; for `selfheal up --demo`, a summary line every ~10 s and one line
per incident opened, healed, rolled back or escalated.

The view never blocks the agents' event loop for long: the fleet's counters are in memory,
the incidents come from one short query every couple of seconds (`poll`, awaited on the
loop), and rich renders from its own refresh thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sim.fleet.fleet import Fleet, FleetEvent, FleetSnapshot
from sim.fleet.metrics import IncidentRow, LiveFigures, live_figures

log = logging.getLogger("sim.fleet")

Mode = Literal["live", "lines", "demo"]
OPEN_ORDER = (
    "detected",
    "deciding",
    "awaiting_approval",
    "blocked_by_policy",
    "staging",
    "applying",
    "verifying",
    "rolling_back",
    "escalated",
)
LINE_EVERY_S = 10.0
POLL_EVERY_S = 2.0


def clock_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def _p(figure: dict[str, float | int | None], key: str) -> str:
    value = figure.get(key)
    return "-" if value is None else f"{float(value):.1f}s"


@dataclass
class Phase:
    """Where the run is: running until `ends_at`, then draining until `drain_until`."""

    name: str = "starting"
    ends_at: float | None = None


@dataclass
class Progress:
    fleet: Fleet
    console: Console
    mode: Mode
    title: str
    poll: Callable[[], Awaitable[list[IncidentRow]]]
    phase: Phase = field(default_factory=Phase)
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self._events: deque[str] = deque(maxlen=6)
        self._figures: LiveFigures | None = None
        self._last: FleetSnapshot | None = None
        self._rates = (0.0, 0.0)
        self._db_error: str | None = None
        self._known: dict[str, str] = {}
        self._live: Live | None = None
        self._snap: FleetSnapshot | None = None

    # -- events ---------------------------------------------------------------------------

    def on_event(self, event: FleetEvent) -> None:
        stamp = clock_text(event.at - self.fleet.t0) if self.fleet.t0 else "--:--"
        text = f"[{stamp}] {event.text}"
        self._events.append(text)
        if self.mode != "live":
            self.console.print(
                text if self.mode == "lines" else f"{stamp}  {event.text}", soft_wrap=True
            )

    def _incident_lines(self, incidents: list[IncidentRow]) -> None:
        """Demo: one line per incident opened / healed / rolled back / escalated."""
        t0 = self.fleet.t0
        for incident in incidents:
            if incident.installation_id is None:
                continue
            before = self._known.get(incident.id)
            self._known[incident.id] = incident.status
            if before == incident.status:
                continue
            who = f"{incident.tenant_id} {incident.installation_id[:8]}"
            stamp = clock_text(self.clock() - t0)
            if before is None:
                self.console.print(
                    f"{stamp}  incident opened: {incident.type} ({incident.severity}) on {who}"
                )
                if incident.status in ("detected", "deciding", "staging"):
                    continue
            how = f" ({incident.status_reason[:120]})" if incident.status_reason else ""
            if incident.status == "resolved":
                self.console.print(f"{stamp}  healed: {incident.type} on {who}{how}")
            elif incident.status == "rolled_back":
                self.console.print(f"{stamp}  rolled back: {incident.type} on {who}{how}")
            elif incident.status == "escalated":
                reason = (incident.status_reason or "")[:120]
                self.console.print(f"{stamp}  escalated to ops: {incident.type} on {who}: {reason}")

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh until `stop` is set."""
        live = None
        if self.mode == "live":
            live = Live(self._render(), console=self.console, refresh_per_second=1, transient=False)
            live.start()
            self._live = live
        last_line = last_poll = 0.0
        try:
            while not stop.is_set():
                now = self.clock()
                # Judging every incident against the truth runs in the agents' event loop:
                # a big fleet is judged less often, so it never starves the agents.
                poll_every = max(POLL_EVERY_S, len(self.fleet.plugins) / 500)
                if now - last_poll >= poll_every:
                    last_poll = now
                    await self._poll()
                self._sample()
                if live is not None:
                    live.update(self._render())
                elif now - last_line >= LINE_EVERY_S and self.fleet.t0:
                    last_line = now
                    self.console.print(self.line(), soft_wrap=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        finally:
            if live is not None:
                with contextlib.suppress(Exception):
                    await self._poll()
                    self._sample()
                    live.update(self._render())
                live.stop()

    async def _poll(self) -> None:
        try:
            incidents = await self.poll()
        except Exception as error:
            self._db_error = f"{type(error).__name__}: {error}"[:200]
            log.warning("progress: reading incidents failed: %s", self._db_error)
            return
        self._db_error = None
        if self.mode == "demo":
            self._incident_lines(incidents)
        fleet = self.fleet
        self._figures = live_figures(
            incidents,
            fleet.records(),
            fleet.truth,
            interval_s=float(fleet.plan.interval_s),
            now=self.clock(),
        )

    def _sample(self) -> FleetSnapshot:
        snap = self.fleet.snapshot()
        last = self._last
        if last is not None and snap.at > last.at:
            span = snap.at - last.at
            self._rates = (
                (snap.heartbeats_sent - last.heartbeats_sent) / span,
                (snap.heartbeats_failed - last.heartbeats_failed) / span,
            )
        if last is None or snap.at - last.at >= 5.0:
            self._last = snap
        self._snap = snap
        return snap

    # -- text -----------------------------------------------------------------------------

    def _timing(self) -> str:
        elapsed = self.clock() - self.fleet.t0 if self.fleet.t0 else 0.0
        if self.mode == "demo":
            return clock_text(elapsed)
        phase = self.phase
        if phase.ends_at is None:
            return f"{clock_text(elapsed)} {phase.name}"
        remaining = max(0.0, phase.ends_at - self.clock())
        return f"{clock_text(elapsed)} {phase.name}, {clock_text(remaining)} left"

    def line(self) -> str:
        snap = self._snap or self._sample()
        figures = self._figures
        sent_rate, _ = self._rates
        faults = sum(snap.problems.values())
        parts = [
            f"[{'demo' if self.mode == 'demo' else 'sim'} {self._timing()}]",
            f"heartbeats {snap.heartbeats_sent} sent ({sent_rate:.1f}/s), {snap.heartbeats_failed} failed",
            f"faults active {faults}",
        ]
        if figures is not None:
            parts.append(
                f"incidents {figures.total}: open {figures.open}, resolved {figures.resolved},"
                f" rolled back {figures.rolled_back}, escalated {figures.escalated}"
            )
            parts.append(f"MTTD p50 {_p(figures.mttd, 'p50')}, MTTR p50 {_p(figures.mttr, 'p50')}")
        parts.append(f"refused {snap.commands_refused}")
        if self._db_error:
            parts.append(f"database: {self._db_error}")
        return " | ".join(parts)

    def _render(self) -> Panel:
        snap = self._snap
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("time", self._timing())
        if snap is not None:
            sent_rate, failed_rate = self._rates
            grid.add_row(
                "heartbeats",
                f"{snap.heartbeats_sent} sent ({sent_rate:.1f}/s)   {snap.heartbeats_failed}"
                f" failed ({failed_rate:.1f}/s)   {snap.running} agents running",
            )
            faults = ", ".join(f"{k} {v}" for k, v in sorted(snap.problems.items())) or "none"
            grid.add_row("faults active", faults)
            grid.add_row("decision service", snap.decision_service)
            grid.add_row(
                "commands",
                f"{snap.commands_applied} applied, {snap.commands_refused} refused,"
                f" {snap.commands_failed} failed in a handler",
            )
        figures = self._figures
        if figures is not None:
            open_text = ", ".join(
                f"{status} {figures.by_status[status]}"
                for status in OPEN_ORDER
                if figures.by_status.get(status)
            )
            grid.add_row("incidents open", open_text or "none")
            grid.add_row(
                "incidents closed",
                f"resolved {figures.resolved}, rolled back {figures.rolled_back},"
                f" other {sum(v for k, v in figures.by_status.items() if k not in OPEN_ORDER) - figures.resolved - figures.rolled_back}"
                f"   (total {figures.total}, false {figures.false})",
            )
            grid.add_row(
                "MTTD",
                f"p50 {_p(figures.mttd, 'p50')}  p95 {_p(figures.mttd, 'p95')}"
                f"  max {_p(figures.mttd, 'max')}  ({figures.mttd['count']} faults detected)",
            )
            grid.add_row(
                "MTTR",
                f"p50 {_p(figures.mttr, 'p50')}  p95 {_p(figures.mttr, 'p95')}"
                f"  max {_p(figures.mttr, 'max')}  ({figures.mttr['count']} healed)",
            )
        if self._db_error:
            grid.add_row("database", Text(self._db_error, style="red"))
        events = Text("\n".join(self._events) or "no fault injected yet", style="dim")
        return Panel(Group(grid, Text(""), events), title=self.title, expand=False)
