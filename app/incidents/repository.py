"""SQL of incident detection and of fleet incidents. Each statement touches only what is
due: the overdue installations through the next_expected_at index, the open incidents through
their status index. Deduplication is the partial unique index on open (installation, type) incidents: a
second detector, or the same one running twice, inserts nothing.

Severity is the rule's (the magnitude), raised to the tenant's severity_floor when the operator
set one: the floor is read in the statement that opens the incident, so a tick opening 10,000
incidents still does it in one statement."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, NamedTuple

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

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
    (joined here, so the statement stays one over up to `limit` rows)."""
    rows = await session.execute(
        text(
            f"""
            WITH due AS (
                UPDATE merchant_plugins m
                SET missed_since = m.next_expected_at + make_interval(secs => :grace)
                WHERE m.id IN (
                    SELECT id FROM merchant_plugins
                    WHERE next_expected_at < now() - make_interval(secs => :grace)
                      AND missed_since IS NULL AND status = 'active'
                    ORDER BY next_expected_at
                    LIMIT :limit
                    FOR UPDATE SKIP LOCKED)
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
    session: AsyncSession, *, healthy_heartbeats: int
) -> list[uuid.UUID]:
    """A missed-heartbeat incident with nothing under way resolves itself once the
    installation has sent `healthy_heartbeats` heartbeats since it was opened."""
    rows = await session.execute(
        text(
            f"""
            UPDATE plugin_incidents i SET
                status = 'resolved', resolved_at = now(), updated_at = now(),
                status_reason = 'heartbeats resumed', next_check_at = NULL
            FROM merchant_plugins m
            WHERE i.type = 'heartbeat_missed' AND i.status IN {RECOVERABLE}
              AND m.id = i.installation_id
              AND m.heartbeat_count
                  >= (i.telemetry_snapshot->>'heartbeat_count')::bigint + :healthy
            RETURNING i.id
            """
        ),
        {"healthy": healthy_heartbeats},
    )
    return list(rows.scalars())


async def claim_new_samples(session: AsyncSession, *, max_samples: int) -> tuple[int, int] | None:
    """(last id read, id to read up to), holding the watermark row until the transaction ends
    so ticks never overlap; None when another worker is reading right now. One statement:
    on an idle tick this is the whole threshold detector."""
    row = (
        await session.execute(
            text(
                """
                SELECT w.last_id,
                       (SELECT coalesce(max(s.id), w.last_id) FROM (
                            SELECT id FROM plugin_heartbeats
                            WHERE id > w.last_id ORDER BY id LIMIT :n) s) AS upto
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
    await session.execute(
        text(
            "UPDATE detector_watermarks SET last_id = :upto, updated_at = now()"
            " WHERE name = 'samples'"
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
                WHERE id > :after AND id <= :upto
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


async def open_incident(
    session: AsyncSession,
    *,
    installation_id: uuid.UUID,
    tenant_id: str,
    plugin_name: str,
    plugin_version: str,
    type: str,
    severity: str,
    first_bad_signal_at: datetime,
    snapshot: dict[str, Any],
) -> bool:
    """Open the incident, or, when one of this type is already open for the installation,
    count the repeat on it (its severity can only go up). True when a new one was opened.
    The severity is the rule's, raised to the tenant's severity_floor."""
    row = await session.execute(
        text(
            f"""
            WITH floor AS (
                SELECT (SELECT severity_floor FROM tenants WHERE id = :tenant) AS severity
            )
            INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name,
                plugin_version, type, severity, status, first_bad_signal_at, telemetry_snapshot)
            SELECT :installation, :tenant, :plugin, :version, :type,
                   {at_least("CAST(:severity AS text)", "floor.severity")}, 'detected',
                   :first_bad, CAST(:snapshot AS jsonb)
            FROM floor
            ON CONFLICT (installation_id, type) WHERE status NOT IN {CLOSED}
            DO UPDATE SET occurrences = plugin_incidents.occurrences + 1,
                          updated_at = now(),
                          severity = {at_least("plugin_incidents.severity", "EXCLUDED.severity")}
            RETURNING (xmax = 0) AS inserted
            """
        ),
        {
            "installation": installation_id,
            "tenant": tenant_id,
            "plugin": plugin_name,
            "version": plugin_version,
            "type": type,
            "severity": severity,
            "first_bad": first_bad_signal_at,
            "snapshot": orjson.dumps(snapshot, default=str).decode(),
        },
    )
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
    if not incident_ids:
        return 0
    result = await session.execute(
        text(
            "UPDATE plugin_incidents SET status = 'resolved', resolved_at = now(),"
            " updated_at = now(), status_reason = :reason, next_check_at = NULL"
            f" WHERE id = ANY(:ids) AND status IN {RECOVERABLE}"
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
    installation. The fleet incident follows: severity one level above the worst linked
    member's own severity (only ever up), earliest first bad signal, and fresh figures (its
    occurrences count its members)."""
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
                    severity = {at_least("i.severity", "'high'")}
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
