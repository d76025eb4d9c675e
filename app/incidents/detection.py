"""One detection tick: open the incidents that are due, resolve the ones that recovered.

Two detectors, each touching only what is due:
- missed heartbeats: installations whose next_expected_at (indexed) is past, plus the grace;
- thresholds: the samples stored since the last tick (a watermark over plugin_heartbeats ids),
  evaluated with the newest samples of the installations that sent them (app/incidents/rules.py).
Recovery is looked at where it can happen: a missed-heartbeat incident only for the
installations that sent samples in the claimed window, a threshold incident with their newest
samples.
Deduplication is the database's: one open incident per (installation, type).
Severity: the rule's (the magnitude), at least the tenant's severity_floor, and the blast
radius: at the end of the tick, the groups (plugin, version, type) its incidents touched may
become a fleet incident that raises its members (app/incidents/fleet.py) until it closes.

Set-based writes, short lock holds (issue 11). A burst of sick plugins used to mean one
INSERT ... ON CONFLICT DO UPDATE per finding, each waiting for the incident row a healing step
held and then holding it until the tick committed (7 s seen under 200 sick plugins), while
healing steps waited on detection in turn. Now every finding of a tick goes to one statement
(repository.record_findings: opens the new incidents and repeats the open ones, the findings
as one JSON document), and:
- the open incidents to repeat are locked FOR UPDATE SKIP LOCKED, so the tick never waits for a
  healing step: a repeat it skips is kept (plugin_incident_repeats) and recorded by the next
  tick. Chosen over "write the incident rows in their own short transaction at the end of the
  tick": a short transaction still waits for a healing step that holds the row, and it would
  commit incidents apart from the watermark that says their samples were read, so a crash in
  between would lose the incidents of those samples (or count them twice). Here the incidents,
  the deferred repeats and the watermark commit together;
- that statement runs after every read of the tick and just before its commit, so the rows it
  locks are held for milliseconds, not for the whole tick;
- resolutions lock SKIP LOCKED as well: one a healing step holds is looked at again at its
  installation's next heartbeat.
Two ticks at once: only the one holding the watermark (claim_new_samples, SKIP LOCKED) reads
samples and writes threshold incidents, so a new incident is neither lost (the watermark moves
in the transaction that records it) nor opened twice (one writer, and the unique index)."""

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
    # Incidents whose repeats wait for the next tick: a healing step held them (SKIP LOCKED).
    deferred: int = 0
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
    # The threshold detector's incident writes come last but one (promote_known_good must
    # see the incidents this tick opened): the incident rows they lock are held until the
    # commit, so nothing slow may follow them.
    async with maker() as session, session.begin():
        opened = await repository.open_missed_heartbeat_incidents(
            session, grace_s=settings.heartbeat_grace_s, limit=TICK_LIMIT
        )
        fleet_due = await fleet_work_due(session)
        more = await detect_thresholds(session, settings)
        known_good = await repository.promote_known_good(
            session, window_s=settings.health_window_s, limit=TICK_LIMIT
        )
    # The fleet step has its own transaction, after the incidents are committed: of two ticks
    # running at once, the one grouping last sees the incidents of both. An idle tick (nothing
    # touched or resolved, no open fleet incident with work) skips it. (fleet_work_due was read
    # before this tick's resolutions, which may have closed a fleet incident's last member.)
    touched = more.touched | {o.group for o in opened}
    fleet = FleetResult()
    if touched or fleet_due or more.resolved:
        async with maker() as session, session.begin():
            fleet = await group_fleets(session, settings, touched, link_limit=TICK_LIMIT)
    result = TickResult(
        opened=len(opened) + more.opened,
        resolved=more.resolved,
        repeated=more.repeated,
        deferred=more.deferred,
        fleet_opened=fleet.opened,
        fleet_linked=fleet.linked,
        fleet_resolved=fleet.resolved,
        touched=frozenset(touched),
        known_good=known_good,
    )
    if (
        result.opened
        or result.resolved
        or result.deferred
        or fleet.opened
        or fleet.linked
        or fleet.resolved
    ):
        log.info(
            "detection_tick",
            opened=result.opened,
            resolved=result.resolved,
            repeated=result.repeated,
            deferred=result.deferred,
            fleet_opened=fleet.opened,
            fleet_linked=fleet.linked,
            fleet_resolved=fleet.resolved,
        )
    return result


async def detect_thresholds(session: AsyncSession, settings: Settings) -> TickResult:
    """The threshold detector and the recovery of missed heartbeats, over the samples stored
    since the last tick; nothing (not even a wait) when another worker holds the watermark.
    The incident writes come last (record_findings), after every read, so the incident rows
    they lock are held for the rest of the transaction only: a commit, not a tick."""
    claimed = await repository.claim_new_samples(session, max_samples=SAMPLES_PER_TICK)
    if claimed is None:
        return TickResult(0, 0)  # another worker is on it
    after, upto = claimed
    if after == upto:
        # Nothing new; the repeats an earlier tick had to defer are still recorded.
        if not await repository.has_deferred_repeats(session):
            return TickResult(0, 0)
        recorded = await repository.record_findings(session, [])
        return TickResult(
            0,
            0,
            recorded.repeats,
            deferred=recorded.deferred,
            touched=frozenset(recorded.repeated),
        )
    t = thresholds(settings)
    per_installation = max(t.consecutive + t.baseline_samples, t.crash_loop_samples)
    rows = await repository.recent_samples_of_active_installations(
        session, after_id=after, upto_id=upto, per_installation=per_installation
    )
    found: list[repository.Found] = []
    recovered_candidates: dict[Any, list[Sample]] = {}
    for installation_id, group in itertools.groupby(rows, key=lambda r: r.id):
        samples_rows = list(group)
        first = samples_rows[0]
        samples = [Sample.of(r) for r in samples_rows]
        recovered_candidates[installation_id] = samples
        found.extend(
            repository.Found(
                installation_id=installation_id,
                tenant_id=first.tenant_id,
                plugin_name=first.plugin_name,
                plugin_version=first.plugin_version,
                type=finding.type,
                severity=finding.severity,
                first_bad_signal_at=finding.first_bad_signal_at,
                snapshot={"evidence": finding.evidence, "telemetry": first.telemetry},
            )
            for finding in findings_for(
                samples,
                t,
                previous_version=first.rollback_target,
                version_changed_at=first.version_changed_at,
            )
        )
    # Missed heartbeats that recovered: only the installations that sent samples now.
    resumed = await repository.resolve_recovered_missed_heartbeats(
        session, after_id=after, upto_id=upto, healthy_heartbeats=settings.recovery_heartbeats
    )
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
    recorded = repository.Recorded([], [], 0, 0)
    if found or await repository.has_deferred_repeats(session):
        recorded = await repository.record_findings(session, found)
    return TickResult(
        len(recorded.opened),
        len(resumed) + resolved,
        recorded.repeats,
        deferred=recorded.deferred,
        touched=frozenset(recorded.opened) | frozenset(recorded.repeated),
    )
