"""One detection tick: open the incidents that are due, resolve the ones that recovered.

Two detectors, each touching only what is due:
- missed heartbeats: installations whose next_expected_at (indexed) is past, plus the grace;
- thresholds: the samples stored since the last tick (a watermark over plugin_heartbeats ids),
  evaluated with the newest samples of the installations that sent them (app/incidents/rules.py).
Deduplication is the database's: one open incident per (installation, type).
Severity: the rule's (the magnitude), at least the tenant's severity_floor, and the blast
radius: at the end of the tick, the groups (plugin, version, type) its incidents touched may
become a fleet incident that raises its members (app/incidents/fleet.py)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.settings import Settings
from app.incidents import repository
from app.incidents.fleet import FleetResult, group_fleets
from app.incidents.fleet import work_due as fleet_work_due
from app.incidents.repository import Group
from app.incidents.rules import Sample, findings_for, healthy_for, thresholds

log = structlog.get_logger("selfheal.detection")

# Most incidents one tick opens per rule, and samples it reads; the rest wait for the next.
TICK_LIMIT = 10_000
SAMPLES_PER_TICK = 50_000


@dataclass(frozen=True, slots=True)
class TickResult:
    opened: int
    resolved: int
    repeated: int = 0
    fleet_opened: int = 0
    fleet_linked: int = 0
    fleet_resolved: int = 0
    known_good: int = 0  # installations whose version became known-good this tick
    # The groups whose incidents this tick opened or repeated: what the fleet step looks at.
    touched: frozenset[Group] = field(default=frozenset(), compare=False)


async def detect_once(maker: async_sessionmaker[AsyncSession], settings: Settings) -> TickResult:
    # One transaction for both detectors: an idle tick is a handful of index probes, and
    # each transaction is a round trip more (the idle tick is what every worker pays twice a
    # second). Both parts skip rows another tick holds, so ticks never wait on each other.
    async with maker() as session, session.begin():
        opened = await repository.open_missed_heartbeat_incidents(
            session, grace_s=settings.heartbeat_grace_s, limit=TICK_LIMIT
        )
        resolved = await repository.resolve_recovered_missed_heartbeats(
            session, healthy_heartbeats=settings.recovery_heartbeats
        )
        more = await detect_thresholds(session, settings)
        fleet_due = await fleet_work_due(session)
        known_good = await repository.promote_known_good(
            session, window_s=settings.health_window_s, limit=TICK_LIMIT
        )
    # The fleet step has its own transaction, after the incidents are committed: of two ticks
    # running at once, the one grouping last sees the incidents of both. An idle tick (nothing
    # touched, no open fleet incident with work) skips it.
    touched = more.touched | {o.group for o in opened}
    fleet = FleetResult()
    if touched or fleet_due:
        async with maker() as session, session.begin():
            fleet = await group_fleets(session, settings, touched, link_limit=TICK_LIMIT)
    result = TickResult(
        opened=len(opened) + more.opened,
        resolved=len(resolved) + more.resolved,
        repeated=more.repeated,
        fleet_opened=fleet.opened,
        fleet_linked=fleet.linked,
        fleet_resolved=fleet.resolved,
        touched=frozenset(touched),
        known_good=known_good,
    )
    if result.opened or result.resolved or fleet.opened or fleet.linked or fleet.resolved:
        log.info(
            "detection_tick",
            opened=result.opened,
            resolved=result.resolved,
            fleet_opened=fleet.opened,
            fleet_linked=fleet.linked,
            fleet_resolved=fleet.resolved,
        )
    return result


async def detect_thresholds(session: AsyncSession, settings: Settings) -> TickResult:
    claimed = await repository.claim_new_samples(session, max_samples=SAMPLES_PER_TICK)
    if claimed is None or claimed[0] == claimed[1]:
        return TickResult(0, 0)  # another worker is on it, or nothing new
    after, upto = claimed
    t = thresholds(settings)
    per_installation = max(t.consecutive + t.baseline_samples, t.crash_loop_samples)
    rows = await repository.recent_samples_of_active_installations(
        session, after_id=after, upto_id=upto, per_installation=per_installation
    )
    opened = repeated = 0
    touched: set[Group] = set()
    recovered_candidates: dict[Any, list[Sample]] = {}
    for installation_id, group in itertools.groupby(rows, key=lambda r: r.id):
        samples_rows = list(group)
        first = samples_rows[0]
        samples = [Sample.of(r) for r in samples_rows]
        recovered_candidates[installation_id] = samples
        for finding in findings_for(
            samples,
            t,
            previous_version=first.rollback_target,
            version_changed_at=first.version_changed_at,
        ):
            inserted = await repository.open_incident(
                session,
                installation_id=installation_id,
                tenant_id=first.tenant_id,
                plugin_name=first.plugin_name,
                plugin_version=first.plugin_version,
                type=finding.type,
                severity=finding.severity,
                first_bad_signal_at=finding.first_bad_signal_at,
                snapshot={"evidence": finding.evidence, "telemetry": first.telemetry},
            )
            opened += inserted
            repeated += not inserted
            touched.add(Group(first.plugin_name, first.plugin_version, finding.type))
    to_resolve = [
        incident.id
        for incident in await repository.open_threshold_incidents_of(
            session, list(recovered_candidates)
        )
        if healthy_for(
            incident.type,
            recovered_candidates[incident.installation_id],
            t,
            settings.recovery_heartbeats,
        )
    ]
    resolved = await repository.resolve_incidents(session, to_resolve, "healthy heartbeats")
    await repository.advance_watermark(session, upto)
    return TickResult(opened, resolved, repeated, touched=frozenset(touched))
