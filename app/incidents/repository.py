"""SQL of incident detection. Each statement touches only what is due: the overdue
installations through the next_expected_at index, the open incidents through their status
index. Deduplication is the partial unique index on open (installation, type) incidents: a
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
