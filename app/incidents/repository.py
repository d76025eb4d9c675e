"""SQL of incident detection and of fleet incidents. Each statement touches only what is
due: the overdue installations through the next_expected_at index, the open incidents through
their status index. Deduplication is the partial unique index on open (installation, type) incidents: a
second detector, or the same one running twice, inserts nothing.

Severity is the rule's (the magnitude), raised to the tenant's severity_floor when the operator
set one: the floor is read in the statement that opens the incident, so a tick opening 10,000
incidents still does it in one statement.

Over 600 lines: one module for the statements of one tick, because they share what keeps them
consistent (the open-incident predicates the partial indexes need, the severity ranking and
at_least, the fleet member floor the 0019 trigger also knows); most of the length is the SQL
itself, a statement a function, each with why it is written that way."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, NamedTuple

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.partitions import SAMPLE_LOOKBACK_SQL, SIGNED_AT_SLACK_SQL, unread_signed_at
from app.core.states import INCIDENT_CLOSED_SQL

# Statuses in which an incident is over; any other status is open (see the partial index).
CLOSED = INCIDENT_CLOSED_SQL

# The version to go back to for the installation `m` (a merchant_plugins row alias): its
# known-good version (the last one healthy for a whole health window), else the version it ran
# before; never the version it runs, and never one it was taken away from because it failed
# there (a patch rolled back, or the version a rollback left) since it was last known good.
# Regression incidents name it, decisions get it as `previous_version`, rollbacks target it.
ROLLBACK_TARGET_SQL = """(
    SELECT c.version FROM (VALUES (1, m.known_good_version), (2, m.previous_version))
        AS c(rank, version)
    WHERE c.version IS NOT NULL AND c.version <> m.plugin_version
      AND NOT EXISTS (
        SELECT 1 FROM plugin_autopatch_attempts a
        WHERE a.installation_id = m.id
          AND a.created_at > COALESCE(m.known_good_at, '-infinity'::timestamptz)
          AND ((a.action = 'patch' AND a.status = 'rolled_back' AND a.to_version = c.version)
               OR (a.action = 'rollback' AND a.status = 'success'
                   AND a.from_version = c.version)))
    ORDER BY c.rank LIMIT 1)"""
# Open incidents with nothing under way: healthy heartbeats resolve them. (An incident that is
# being decided on, staged, applied or verified belongs to the healing loop.)
RECOVERABLE = "('detected', 'awaiting_approval', 'blocked_by_policy', 'escalated')"

# Severities in rising order, as a PostgreSQL array: array_position() is the rank.
RANKS = "ARRAY['low', 'medium', 'high', 'critical']"


def at_least(severity: str, floor: str) -> str:
    """SQL for `severity` raised to `floor` (both SQL expressions; a NULL floor changes
    nothing). The CASE form is the one the ON CONFLICT repeat uses: severity only goes up."""
    return (
        f"CASE WHEN array_position({RANKS}, {floor}) > array_position({RANKS}, {severity})"
        f" THEN {floor} ELSE {severity} END"
    )


class Group(NamedTuple):
    """What one fleet incident stands for: the incidents of one type on one plugin version."""

    plugin_name: str
    plugin_version: str | None
    type: str


class Opened(NamedTuple):
    id: uuid.UUID
    group: Group


async def open_missed_heartbeat_incidents(
    session: AsyncSession, *, grace_s: int, limit: int
) -> list[Opened]:
    """An installation is missing when its deadline (last heartbeat + interval, kept in
    next_expected_at) plus the grace has passed. One that never sent a heartbeat has no
    deadline: it is new, not missing. first_bad_signal_at is the moment it became late, so
    detected_at - first_bad_signal_at is the detection delay.

    Flagging the installation (missed_since) in the same statement keeps the next ticks from
    looking at it again until a heartbeat clears the flag: a tick reads only the newly overdue
    rows of the next_expected_at index, however many installations are already missing.

    A missing installation is a medium incident, or its tenant's severity_floor if higher
    (joined here, so the statement stays one over up to `limit` rows).

    An installation in a maintenance window (its own or its tenant's) is not missing: its
    silence is expected. Its deadline moves to the window's end instead (re-read at least
    every grace period, so a window cut short counts), which keeps it off the next ticks'
    overdue range, and it is missing only if it is still silent a grace period after the
    window ended (first_bad_signal_at is then that moment)."""
    rows = await session.execute(
        text(
            f"""
            WITH overdue AS (
                SELECT m.id,
                       (SELECT max(w.ends_at) FROM maintenance_windows w
                        WHERE (w.installation_id = m.id OR w.tenant_id = m.tenant_id)
                          AND now() >= w.starts_at AND now() < w.ends_at) AS window_ends_at
                FROM merchant_plugins m
                WHERE m.next_expected_at < now() - make_interval(secs => :grace)
                  AND m.missed_since IS NULL AND m.status = 'active'
                ORDER BY m.next_expected_at
                LIMIT :limit
                FOR UPDATE OF m SKIP LOCKED
            ),
            in_maintenance AS (
                UPDATE merchant_plugins m
                SET next_expected_at = least(o.window_ends_at,
                                             now() + make_interval(secs => :grace))
                FROM overdue o
                WHERE m.id = o.id AND o.window_ends_at IS NOT NULL
            ),
            due AS (
                UPDATE merchant_plugins m
                SET missed_since = m.next_expected_at + make_interval(secs => :grace)
                FROM overdue o
                WHERE m.id = o.id AND o.window_ends_at IS NULL
                RETURNING m.id, m.tenant_id, m.plugin_name, m.plugin_version, m.missed_since,
                          m.last_heartbeat_at, m.next_expected_at, m.heartbeat_count,
                          m.telemetry
            )
            INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, plugin_version,
                type, severity, status, first_bad_signal_at, telemetry_snapshot)
            SELECT due.id, due.tenant_id, due.plugin_name, due.plugin_version,
                'heartbeat_missed', {at_least("'medium'", "t.severity_floor")},
                'detected', due.missed_since,
                jsonb_build_object(
                    'last_heartbeat_at', due.last_heartbeat_at,
                    'next_expected_at', due.next_expected_at,
                    'heartbeat_count', due.heartbeat_count,
                    'telemetry', due.telemetry)
            FROM due LEFT JOIN tenants t ON t.id = due.tenant_id
            ON CONFLICT (installation_id, type) WHERE status NOT IN {CLOSED} DO NOTHING
            RETURNING id, plugin_name, plugin_version, type
            """
        ),
        {"grace": grace_s, "limit": limit},
    )
    return [Opened(r.id, Group(r.plugin_name, r.plugin_version, r.type)) for r in rows]


async def resolve_recovered_missed_heartbeats(
    session: AsyncSession, *, after_id: int, upto_id: int, healthy_heartbeats: int
) -> list[uuid.UUID]:
    """A missed-heartbeat incident with nothing under way resolves itself once the
    installation has sent `healthy_heartbeats` heartbeats since it was opened.

    Only the installations that sent a sample in the window the threshold detector claimed,
    (after_id, upto_id], are looked at: a heartbeat is the only thing that can make one
    recover, and each sample is in exactly one claimed window (claim_new_samples), so every
    heartbeat leads to one look at its installation's incident, by whichever worker holds the
    watermark, however many workers tick (one that skips the claim skips this too). The
    incidents are locked SKIP LOCKED: one a healing step holds is looked at again at its
    installation's next heartbeat, instead of making the tick wait. (`status NOT IN CLOSED`
    lets the planner use the partial unique index on open incidents; only the incidents that
    resolve are locked.)"""
    rows = await session.execute(
        text(
            f"""
            UPDATE plugin_incidents i SET
                status = 'resolved', resolved_at = now(), updated_at = now(),
                status_reason = 'heartbeats resumed', next_check_at = NULL
            WHERE i.id IN (
                SELECT o.id FROM plugin_incidents o
                JOIN merchant_plugins m ON m.id = o.installation_id
                WHERE o.installation_id IN (
                    SELECT h.installation_id FROM plugin_heartbeats h
                    WHERE h.id > :after AND h.id <= :upto
                      AND {unread_signed_at("h.signed_at")})
                  AND o.type = 'heartbeat_missed' AND o.status NOT IN {CLOSED}
                  AND o.status IN {RECOVERABLE}
                  AND m.heartbeat_count
                      >= (o.telemetry_snapshot->>'heartbeat_count')::bigint + :healthy
                FOR UPDATE OF o SKIP LOCKED)
              AND i.status IN {RECOVERABLE}
            RETURNING i.id
            """
        ),
        {"after": after_id, "upto": upto_id, "healthy": healthy_heartbeats},
    )
    return list(rows.scalars())


async def claim_new_samples(session: AsyncSession, *, max_samples: int) -> tuple[int, int] | None:
    """(last id read, id to read up to), holding the watermark row until the transaction ends
    so ticks never overlap; None when another worker is reading right now. One statement:
    on an idle tick this is the whole threshold detector. The bound on signed_at (app/core/
    partitions.py) keeps the scan to the recent partitions: every unread sample is within it."""
    row = (
        await session.execute(
            text(
                f"""
                SELECT w.last_id,
                       (SELECT coalesce(max(s.id), w.last_id) FROM (
                            SELECT id FROM plugin_heartbeats
                            WHERE id > w.last_id
                              AND signed_at >= coalesce(w.last_signed_at, '-infinity')
                                               - {SIGNED_AT_SLACK_SQL}
                              AND signed_at < now() + {SIGNED_AT_SLACK_SQL}
                            ORDER BY id LIMIT :n) s) AS upto
                FROM detector_watermarks w WHERE w.name = 'samples'
                FOR UPDATE OF w SKIP LOCKED
                """
            ),
            {"n": max_samples},
        )
    ).first()
    if row is None:
        return None
    return int(row.last_id), int(row.upto)


async def advance_watermark(session: AsyncSession, upto: int) -> None:
    """The watermark moves to `upto`, with that sample's signed_at: what bounds the next scan
    (app/core/partitions.py; kept as it was if the sample is gone, its installation deleted)."""
    await session.execute(
        text(
            f"""
            UPDATE detector_watermarks w SET last_id = :upto, updated_at = now(),
                last_signed_at = coalesce(
                    (SELECT h.signed_at FROM plugin_heartbeats h
                     WHERE h.id = :upto
                       AND h.signed_at >= coalesce(w.last_signed_at, '-infinity')
                                          - {SIGNED_AT_SLACK_SQL}
                       AND h.signed_at < now() + {SIGNED_AT_SLACK_SQL}),
                    w.last_signed_at)
            WHERE w.name = 'samples'
            """
        ),
        {"upto": upto},
    )


async def recent_samples_of_active_installations(
    session: AsyncSession, *, after_id: int, upto_id: int, per_installation: int
) -> list[Any]:
    """The newest samples of every installation that sent one since the last tick, with what
    the rules need to know about it. Installations in maintenance, and those whose missed
    heartbeat incident is open (inhibition: that incident says everything), are left out."""
    rows = await session.execute(
        text(
            f"""
            WITH touched AS (
                SELECT DISTINCT installation_id FROM plugin_heartbeats
                WHERE id > :after AND id <= :upto AND {unread_signed_at("signed_at")}
            )
            SELECT m.id, m.tenant_id, m.plugin_name, m.plugin_version,
                   {ROLLBACK_TARGET_SQL} AS rollback_target, m.version_changed_at, m.telemetry,
                   s.received_at, s.requests, s.errors, s.webhook_attempts, s.webhook_failures,
                   s.uptime_s, s.sample_version, s.sent_at
            FROM touched t
            JOIN merchant_plugins m ON m.id = t.installation_id AND m.status = 'active'
            CROSS JOIN LATERAL (
                SELECT h.received_at, h.requests, h.errors, h.webhook_attempts,
                       h.webhook_failures, h.uptime_s, h.plugin_version AS sample_version,
                       h.sent_at
                FROM plugin_heartbeats h
                WHERE h.installation_id = m.id
                  -- The recent partitions only (app/core/partitions.py, SAMPLE_LOOKBACK_SQL).
                  AND h.signed_at > now() - {SAMPLE_LOOKBACK_SQL}
                  AND h.signed_at < now() + {SIGNED_AT_SLACK_SQL}
                ORDER BY h.received_at DESC
                LIMIT :per
            ) s
            WHERE NOT EXISTS (
                SELECT 1 FROM plugin_incidents i
                WHERE i.installation_id = m.id AND i.type = 'heartbeat_missed'
                  AND i.status NOT IN {CLOSED})
              -- A change is landing or being verified here: the healing loop judges its
              -- health (and rolls it back); a new incident would only be noise.
              AND NOT EXISTS (
                SELECT 1 FROM plugin_autopatch_attempts a
                WHERE a.installation_id = m.id AND a.status IN ('applying', 'verifying'))
              AND NOT EXISTS (
                SELECT 1 FROM maintenance_windows w
                WHERE (w.installation_id = m.id OR w.tenant_id = m.tenant_id)
                  AND now() >= w.starts_at AND now() < w.ends_at)
            ORDER BY m.id, s.received_at DESC
            """
        ),
        {"after": after_id, "upto": upto_id, "per": per_installation},
    )
    return list(rows)


class Found(NamedTuple):
    """One finding of the threshold rules on one installation (app/incidents/rules.py), as
    record_findings takes it: at most one per (installation, type) in a call."""

    installation_id: uuid.UUID
    tenant_id: str
    plugin_name: str
    plugin_version: str | None
    type: str
    severity: str  # the rule's; record_findings raises it to the tenant's floor
    first_bad_signal_at: datetime
    snapshot: dict[str, Any]


class Recorded(NamedTuple):
    """What record_findings did: the groups of the incidents it opened and repeated (the fleet
    step looks at them), how many repeats it recorded (this call's and deferred ones), and how
    many incidents' repeats it deferred because a healing step held them."""

    opened: list[Group]
    repeated: list[Group]
    repeats: int
    deferred: int


# The severity linking to a fleet incident raises a member to (link_members); the trigger of
# migration 0019 gives a member its own severity back only while it still has this one.
FLEET_MEMBER_FLOOR = "'high'"


async def record_findings(session: AsyncSession, found: list[Found]) -> Recorded:
    """Open the incidents of `found` that have none open, and count the others as repeats of
    the open one: one statement for the whole tick, with the findings as one JSON document.

    Semantics of each repeat (as the per-finding ON CONFLICT DO UPDATE had them): occurrences
    counted, the severity only goes up; a new incident has the rule's severity raised to its
    tenant's severity_floor, and that raised severity is what a repeat brings. A member a
    fleet incident raised keeps its own severity (own_severity) raised by repeats too.
    Deduplication stays the partial unique index on open (installation, type): the insert is
    ON CONFLICT DO NOTHING on it.

    Short lock holds: the open incidents to repeat are locked FOR UPDATE SKIP LOCKED. One that
    a healing step holds is not waited for: its repeat (how many, the highest severity) goes
    to plugin_incident_repeats, and this statement at the next tick adds it to the incident,
    along with that tick's own repeats (or drops it if the incident closed meanwhile). The
    tick calls this last in its transaction (app/incidents/detection.py), so the locks it
    takes are held for the time of a commit, not of a tick.

    Concurrency: only the tick holding the samples watermark calls this (claim_new_samples),
    so no two calls run at once and plugin_incident_repeats has one writer. The statement's
    snapshot decides what is open: a finding whose incident is not visible as open is
    inserted, and the unique index makes that a no-op (no repeat counted) in the rare case
    another path opened one meanwhile; an open incident that closes between the snapshot and
    the lock is not repeated (its deferred repeat is dropped at the next tick)."""
    rows = await session.execute(
        text(
            f"""
            WITH found AS MATERIALIZED (
                SELECT f.installation_id, f.tenant_id, f.plugin_name, f.plugin_version, f.type,
                       {at_least("f.severity", "t.severity_floor")} AS severity,
                       f.first_bad_signal_at, f.snapshot
                FROM json_to_recordset(CAST(:found AS json)) AS f(
                    installation_id uuid, tenant_id text, plugin_name text,
                    plugin_version text, type text, severity text,
                    first_bad_signal_at timestamptz, snapshot jsonb)
                LEFT JOIN tenants t ON t.id = f.tenant_id
            ),
            open AS MATERIALIZED (
                -- The open incident of each finding, as this statement's snapshot sees it.
                SELECT i.id, f.installation_id, f.type, f.severity
                FROM found f
                JOIN plugin_incidents i
                  ON i.installation_id = f.installation_id AND i.type = f.type
                 AND i.status NOT IN {CLOSED}
            ),
            wanted AS MATERIALIZED (
                -- The repeats to record per open incident: this call's, and those deferred
                -- by earlier ticks.
                SELECT i.id, i.plugin_name, i.plugin_version, i.type,
                       sum(x.n)::integer AS n,
                       ({RANKS})[max(array_position({RANKS}, x.severity))] AS severity
                FROM (SELECT o.id, 1 AS n, o.severity FROM open o
                      UNION ALL
                      SELECT r.incident_id, r.occurrences, r.severity
                      FROM plugin_incident_repeats r) x
                JOIN plugin_incidents i ON i.id = x.id AND i.status NOT IN {CLOSED}
                GROUP BY i.id
            ),
            locked AS MATERIALIZED (
                SELECT i.id FROM plugin_incidents i
                WHERE i.id IN (SELECT w.id FROM wanted w) AND i.status NOT IN {CLOSED}
                FOR UPDATE OF i SKIP LOCKED
            ),
            repeated AS (
                UPDATE plugin_incidents i SET
                    occurrences = i.occurrences + w.n,
                    updated_at = now(),
                    severity = {at_least("i.severity", "w.severity")},
                    own_severity = CASE WHEN i.own_severity IS NOT NULL
                                        THEN {at_least("i.own_severity", "w.severity")} END
                FROM wanted w
                WHERE i.id = w.id AND i.id IN (SELECT l.id FROM locked l)
                RETURNING w.plugin_name, w.plugin_version, w.type, w.n
            ),
            skipped AS (
                SELECT w.* FROM wanted w WHERE NOT EXISTS (SELECT 1 FROM locked l WHERE l.id = w.id)
            ),
            deferred AS (
                INSERT INTO plugin_incident_repeats (incident_id, occurrences, severity)
                SELECT s.id, s.n, s.severity FROM skipped s
                ON CONFLICT (incident_id) DO UPDATE
                SET occurrences = EXCLUDED.occurrences, severity = EXCLUDED.severity
                RETURNING incident_id
            ),
            cleared AS (
                -- Recorded now, or their incident closed: the others were re-written above.
                DELETE FROM plugin_incident_repeats r
                WHERE NOT EXISTS (SELECT 1 FROM skipped s WHERE s.id = r.incident_id)
            ),
            opened AS (
                INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name,
                    plugin_version, type, severity, status, first_bad_signal_at,
                    telemetry_snapshot)
                SELECT f.installation_id, f.tenant_id, f.plugin_name, f.plugin_version, f.type,
                       f.severity, 'detected', f.first_bad_signal_at, f.snapshot
                FROM found f
                WHERE NOT EXISTS (SELECT 1 FROM open o
                                  WHERE o.installation_id = f.installation_id
                                    AND o.type = f.type)
                ON CONFLICT (installation_id, type) WHERE status NOT IN {CLOSED} DO NOTHING
                RETURNING plugin_name, plugin_version, type
            )
            SELECT 'opened' AS outcome, plugin_name, plugin_version, type, 1 AS n FROM opened
            UNION ALL
            SELECT 'repeated', plugin_name, plugin_version, type, n FROM repeated
            UNION ALL
            SELECT 'deferred', s.plugin_name, s.plugin_version, s.type, s.n
            FROM deferred d JOIN skipped s ON s.id = d.incident_id
            """
        ),
        {"found": orjson.dumps([f._asdict() for f in found], default=str).decode()},
    )
    opened: list[Group] = []
    repeated: list[Group] = []
    repeats = deferred = 0
    for row in rows:
        group = Group(row.plugin_name, row.plugin_version, row.type)
        if row.outcome == "opened":
            opened.append(group)
        elif row.outcome == "repeated":
            repeated.append(group)
            repeats += int(row.n)
        else:
            deferred += 1
    return Recorded(opened, repeated, repeats, deferred)


async def has_deferred_repeats(session: AsyncSession) -> bool:
    """Whether an earlier tick deferred repeats (record_findings): a tick with no new samples
    still records them. An index probe of an empty table, on an idle tick."""
    row = await session.execute(text("SELECT EXISTS (SELECT 1 FROM plugin_incident_repeats)"))
    return bool(row.scalar_one())


async def open_threshold_incidents_of(
    session: AsyncSession, installation_ids: list[uuid.UUID]
) -> list[Any]:
    rows = await session.execute(
        text(
            "SELECT id, installation_id, type FROM plugin_incidents"
            f" WHERE installation_id = ANY(:ids) AND status IN {RECOVERABLE}"
            "  AND type IN ('webhook_fail_rate', 'error_spike', 'crash_loop', 'regression')"
        ),
        {"ids": installation_ids},
    )
    return list(rows)


async def resolve_incidents(
    session: AsyncSession, incident_ids: list[uuid.UUID], reason: str
) -> int:
    """Resolve those of these incidents that are still recoverable. SKIP LOCKED: one a healing
    step holds is left to the next look (its installation's next heartbeat) rather than
    making the tick wait."""
    if not incident_ids:
        return 0
    result = await session.execute(
        text(
            "UPDATE plugin_incidents SET status = 'resolved', resolved_at = now(),"
            " updated_at = now(), status_reason = :reason, next_check_at = NULL"
            " WHERE id IN (SELECT id FROM plugin_incidents"
            f"  WHERE id = ANY(:ids) AND status IN {RECOVERABLE} FOR UPDATE SKIP LOCKED)"
            f" AND status IN {RECOVERABLE}"
        ),
        {"ids": incident_ids, "reason": reason},
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def promote_known_good(session: AsyncSession, *, window_s: int, limit: int) -> int:
    """Installations whose current version has been healthy for a whole health window (no
    incident since their streak began, `good_since`, and a heartbeat after the window) get it
    as their known-good version. The partial index holds only installations waiting for this."""
    result = await session.execute(
        text(
            f"""
            UPDATE merchant_plugins m
            SET known_good_version = m.plugin_version, known_good_at = now()
            WHERE m.id IN (
                SELECT id FROM merchant_plugins
                WHERE good_since IS NOT NULL
                  AND known_good_version IS DISTINCT FROM plugin_version
                  AND good_since <= now() - make_interval(secs => :window)
                  AND last_heartbeat_at >= good_since + make_interval(secs => :window)
                  AND missed_since IS NULL AND status = 'active'
                ORDER BY good_since
                LIMIT :limit
                FOR UPDATE SKIP LOCKED)
              AND NOT EXISTS (SELECT 1 FROM plugin_incidents i
                              WHERE i.installation_id = m.id AND i.status NOT IN {CLOSED})
            """
        ),
        {"window": window_s, "limit": limit},
    )
    return int(getattr(result, "rowcount", 0) or 0)


# --- fleet incidents (app/incidents/fleet.py: when they open, what they cost, concurrency) ----


def open_fleet(alias: str = "") -> str:
    """The predicate of uq_plugin_incidents_open_fleet (an open fleet incident). The planner,
    and ON CONFLICT's index inference, use a partial index only when the query's WHERE
    implies the index's: keep these the indexes' predicates."""
    a = f"{alias}." if alias else ""
    return f"{a}installation_id IS NULL AND {a}status NOT IN {CLOSED}"


def open_member(alias: str) -> str:
    """An open incident of an active installation: the predicate of
    ix_plugin_incidents_open_members (which the planner needs to see), and the installation
    still active, since shares are taken over active installations and a disabled one's
    incidents, which nothing closes any more, must neither make nor hold a fleet incident."""
    return (
        f"{alias}.installation_id IS NOT NULL AND {alias}.status NOT IN {CLOSED}"
        f" AND EXISTS (SELECT 1 FROM merchant_plugins active_{alias}"
        f" WHERE active_{alias}.id = {alias}.installation_id"
        f" AND active_{alias}.status = 'active')"
    )


def one_above(rank: str) -> str:
    """SQL: the severity one level above the rank (array_position in RANKS), capped."""
    return f"({RANKS})[least({rank} + 1, 4)]"


async def open_fleets(session: AsyncSession) -> list[Any]:
    """The open fleet incidents (a few at most), each with whether its group has open
    incidents waiting to be linked and whether any of its members is still open: two index
    probes each. Reads only; the steps that change something lock what they change."""
    rows = await session.execute(
        text(
            f"""
            SELECT f.id,
                EXISTS (SELECT 1 FROM plugin_incidents m
                        WHERE m.plugin_name = f.plugin_name
                          AND m.plugin_version = f.plugin_version AND m.type = f.type
                          AND m.fleet_incident_id IS NULL AND {open_member("m")}) AS unlinked,
                EXISTS (SELECT 1 FROM plugin_incidents m
                        WHERE m.plugin_name = f.plugin_name
                          AND m.plugin_version = f.plugin_version AND m.type = f.type
                          AND m.fleet_incident_id = f.id AND {open_member("m")}) AS open_members
            FROM plugin_incidents f
            WHERE {open_fleet("f")}
            """
        )
    )
    return list(rows)


async def open_fleet_incidents(
    session: AsyncSession, groups: list[Group], *, min_installations: int, min_share: float
) -> list[uuid.UUID]:
    """Open a fleet incident for each of `groups` that has no open one and whose open, not yet
    grouped incidents reach both thresholds. It is 'detected' like any incident; its severity
    is one level above its worst member's, first_bad_signal_at the earliest of theirs, and the
    snapshot says how wide the problem is. The members are linked by link_members."""
    rows = await session.execute(
        text(
            f"""
            WITH touched AS (
                SELECT DISTINCT plugin_name, plugin_version, type
                FROM unnest(CAST(:names AS text[]), CAST(:versions AS text[]),
                            CAST(:types AS text[])) AS g(plugin_name, plugin_version, type)
            ),
            counted AS (
                SELECT t.plugin_name, t.plugin_version, t.type, s.members, s.tenants, s.top,
                       s.first_bad
                FROM touched t
                CROSS JOIN LATERAL (
                    SELECT count(*) AS members, count(DISTINCT i.tenant_id) AS tenants,
                           max(array_position({RANKS}, i.severity)) AS top,
                           min(i.first_bad_signal_at) AS first_bad
                    FROM plugin_incidents i
                    WHERE i.plugin_name = t.plugin_name AND i.plugin_version = t.plugin_version
                      AND i.type = t.type AND i.fleet_incident_id IS NULL
                      AND {open_member("i")}
                ) s
                WHERE s.members >= :min_members
                  AND NOT EXISTS (
                    SELECT 1 FROM plugin_incidents f
                    WHERE f.plugin_name = t.plugin_name AND f.plugin_version = t.plugin_version
                      AND f.type = t.type AND {open_fleet("f")})
            ),
            sized AS (
                SELECT c.*, a.active
                FROM counted c
                CROSS JOIN LATERAL (
                    SELECT count(*) AS active FROM (
                        SELECT 1 FROM merchant_plugins m
                        WHERE m.plugin_name = c.plugin_name
                          AND m.plugin_version = c.plugin_version AND m.status = 'active'
                        LIMIT CASE WHEN :min_share > 0
                                   THEN CAST(floor(c.members / :min_share) AS bigint) + 1 END
                    ) capped
                ) a
            )
            INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name,
                plugin_version, type, severity, status, first_bad_signal_at, telemetry_snapshot,
                occurrences)
            SELECT NULL, NULL, plugin_name, plugin_version, type, {one_above("top")},
                'detected', first_bad,
                jsonb_build_object(
                    'members', members,
                    'active_installations', active,
                    'share', round(members::numeric / active, 4),
                    'tenants', tenants,
                    'min_installations', CAST(:min_members AS integer),
                    'min_share', CAST(:min_share AS double precision)),
                members
            FROM sized
            WHERE active > 0 AND members::double precision / active >= :min_share
            ON CONFLICT (plugin_name, plugin_version, type) WHERE {open_fleet()} DO NOTHING
            RETURNING id
            """
        ),
        {
            "names": [g.plugin_name for g in groups],
            "versions": [g.plugin_version for g in groups],
            "types": [g.type for g in groups],
            "min_members": min_installations,
            "min_share": float(min_share),
        },
    )
    return list(rows.scalars())


async def link_members(session: AsyncSession, fleet_ids: list[uuid.UUID], *, limit: int) -> int:
    """Link the open, not yet grouped incidents of each of these fleet incidents' groups to it
    (at most `limit` per call; the rest on the next tick) and raise them to at least high:
    a problem shared by a good part of the fleet is bigger than its magnitude on one
    installation. A member raised keeps the severity it had in own_severity: the trigger of
    migration 0019 gives it back when the fleet incident closes. The fleet incident follows:
    severity one level above the worst linked member's own severity (only ever up), earliest
    first bad signal, and fresh figures (its occurrences count its members)."""
    result = await session.execute(
        text(
            f"""
            WITH fleets AS MATERIALIZED (
                SELECT id, plugin_name, plugin_version, type FROM plugin_incidents
                WHERE id = ANY(:fleets) AND {open_fleet()}
                FOR UPDATE SKIP LOCKED
            ),
            candidates AS MATERIALIZED (
                SELECT i.id, f.id AS fleet_id, i.severity AS own_severity,
                       i.first_bad_signal_at, i.tenant_id
                FROM fleets f
                JOIN plugin_incidents i
                  ON i.plugin_name = f.plugin_name AND i.plugin_version = f.plugin_version
                 AND i.type = f.type AND i.fleet_incident_id IS NULL AND {open_member("i")}
                ORDER BY i.id
                LIMIT :limit
                FOR UPDATE OF i SKIP LOCKED
            ),
            linked AS (
                UPDATE plugin_incidents i
                SET fleet_incident_id = c.fleet_id, updated_at = now(),
                    severity = {at_least("i.severity", FLEET_MEMBER_FLOOR)},
                    -- What it is on its own, for when the fleet incident closes (0019).
                    own_severity = CASE
                        WHEN array_position({RANKS}, i.severity)
                             < array_position({RANKS}, {FLEET_MEMBER_FLOOR})
                        THEN i.severity ELSE i.own_severity END
                FROM candidates c
                WHERE i.id = c.id
                RETURNING c.fleet_id, c.own_severity, c.first_bad_signal_at, c.tenant_id
            ),
            per_fleet AS (
                SELECT l.fleet_id, count(*) AS n,
                       max(array_position({RANKS}, l.own_severity)) AS top,
                       min(l.first_bad_signal_at) AS first_bad
                FROM linked l GROUP BY l.fleet_id
            ),
            figures AS MATERIALIZED (
                -- This statement's snapshot does not see the links made above: count them in.
                SELECT p.fleet_id, p.top, p.first_bad,
                       p.n + (SELECT count(*) FROM plugin_incidents m
                              WHERE m.fleet_incident_id = p.fleet_id) AS members,
                       (SELECT count(DISTINCT x.tenant_id) FROM (
                            SELECT m.tenant_id FROM plugin_incidents m
                            WHERE m.fleet_incident_id = p.fleet_id
                            UNION ALL
                            SELECT l.tenant_id FROM linked l WHERE l.fleet_id = p.fleet_id
                        ) x) AS tenants,
                       (SELECT count(*) FROM merchant_plugins mp
                        WHERE mp.plugin_name = f.plugin_name
                          AND mp.plugin_version = f.plugin_version
                          AND mp.status = 'active') AS active,
                       p.n
                FROM per_fleet p JOIN fleets f ON f.id = p.fleet_id
            )
            UPDATE plugin_incidents f SET
                severity = {at_least("f.severity", one_above("x.top"))},
                first_bad_signal_at = least(f.first_bad_signal_at, x.first_bad),
                occurrences = x.members,
                telemetry_snapshot = f.telemetry_snapshot || jsonb_build_object(
                    'members', x.members,
                    'active_installations', x.active,
                    'share', CASE WHEN x.active > 0
                                  THEN round(x.members::numeric / x.active, 4) END,
                    'tenants', x.tenants),
                updated_at = now()
            FROM figures x
            WHERE f.id = x.fleet_id
            RETURNING x.n
            """
        ),
        {"fleets": fleet_ids, "limit": limit},
    )
    return sum(int(n) for n in result.scalars())


async def resolve_finished(session: AsyncSession, fleet_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """Resolve those of these fleet incidents none of whose members is open any more (and
    whose group has no open incident waiting to be linked).

    Lock first (SKIP LOCKED: one a concurrent tick is linking to is left for the next tick),
    then check again in a statement whose snapshot is taken after the lock: a member linked by
    a concurrent tick that committed in between keeps its fleet incident open."""
    locked = list(
        (
            await session.execute(
                text(
                    f"SELECT id FROM plugin_incidents WHERE id = ANY(:ids) AND {open_fleet()}"
                    " FOR UPDATE SKIP LOCKED"
                ),
                {"ids": fleet_ids},
            )
        ).scalars()
    )
    if not locked:
        return []
    rows = await session.execute(
        text(
            f"""
            UPDATE plugin_incidents f SET
                status = 'resolved', resolved_at = now(), updated_at = now(),
                next_check_at = NULL, status_reason = 'every member incident is closed'
            WHERE f.id = ANY(:ids) AND {open_fleet("f")}
              AND NOT EXISTS (
                SELECT 1 FROM plugin_incidents m
                WHERE m.plugin_name = f.plugin_name AND m.plugin_version = f.plugin_version
                  AND m.type = f.type AND m.fleet_incident_id = f.id AND {open_member("m")})
              AND NOT EXISTS (
                SELECT 1 FROM plugin_incidents m
                WHERE m.plugin_name = f.plugin_name AND m.plugin_version = f.plugin_version
                  AND m.type = f.type AND m.fleet_incident_id IS NULL AND {open_member("m")})
            RETURNING f.id
            """
        ),
        {"ids": locked},
    )
    return list(rows.scalars())
