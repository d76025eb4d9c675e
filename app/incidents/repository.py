"""SQL of incident detection. Each statement touches only what is due: the overdue
installations through the next_expected_at index, the open incidents through their status
index. Deduplication is the partial unique index on open (installation, type) incidents: a
second detector, or the same one running twice, inserts nothing."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# Statuses in which an incident is over; any other status is open (see the partial index).
CLOSED = "('resolved', 'rolled_back', 'failed', 'cancelled', 'ignored')"


async def open_missed_heartbeat_incidents(
    session: AsyncSession, *, grace_s: int, limit: int
) -> list[uuid.UUID]:
    """An installation is missing when its deadline (last heartbeat + interval, kept in
    next_expected_at) plus the grace has passed. One that never sent a heartbeat has no
    deadline: it is new, not missing. first_bad_signal_at is the moment it became late, so
    detected_at - first_bad_signal_at is the detection delay.

    Flagging the installation (missed_since) in the same statement keeps the next ticks from
    looking at it again until a heartbeat clears the flag: a tick reads only the newly overdue
    rows of the next_expected_at index, however many installations are already missing."""
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
            SELECT id, tenant_id, plugin_name, plugin_version, 'heartbeat_missed', 'medium',
                'detected', missed_since,
                jsonb_build_object(
                    'last_heartbeat_at', last_heartbeat_at,
                    'next_expected_at', next_expected_at,
                    'heartbeat_count', heartbeat_count,
                    'telemetry', telemetry)
            FROM due
            ON CONFLICT (installation_id, type) WHERE status NOT IN {CLOSED} DO NOTHING
            RETURNING id
            """
        ),
        {"grace": grace_s, "limit": limit},
    )
    return list(rows.scalars())


async def resolve_recovered_missed_heartbeats(
    session: AsyncSession, *, healthy_heartbeats: int
) -> list[uuid.UUID]:
    """A missed-heartbeat incident that is still only detected resolves itself once the
    installation has sent `healthy_heartbeats` heartbeats since it was opened."""
    rows = await session.execute(
        text(
            """
            UPDATE plugin_incidents i SET
                status = 'resolved', resolved_at = now(), updated_at = now(),
                status_reason = 'heartbeats resumed'
            FROM merchant_plugins m
            WHERE i.type = 'heartbeat_missed' AND i.status = 'detected'
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
    so ticks never overlap; None when another worker is reading right now."""
    row = (
        await session.execute(
            text(
                "SELECT last_id FROM detector_watermarks WHERE name = 'samples'"
                " FOR UPDATE SKIP LOCKED"
            )
        )
    ).first()
    if row is None:
        return None
    last_id = int(row[0])
    upto = (
        await session.execute(
            text(
                "SELECT coalesce(max(id), :last) FROM (SELECT id FROM plugin_heartbeats"
                " WHERE id > :last ORDER BY id LIMIT :n) s"
            ),
            {"last": last_id, "n": max_samples},
        )
    ).scalar_one()
    return last_id, int(upto)


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
            SELECT m.id, m.tenant_id, m.plugin_name, m.plugin_version, m.previous_version,
                   m.version_changed_at, m.telemetry,
                   s.received_at, s.requests, s.errors, s.webhook_attempts, s.webhook_failures,
                   s.uptime_s
            FROM touched t
            JOIN merchant_plugins m ON m.id = t.installation_id AND m.status = 'active'
            CROSS JOIN LATERAL (
                SELECT h.received_at, h.requests, h.errors, h.webhook_attempts,
                       h.webhook_failures, h.uptime_s
                FROM plugin_heartbeats h
                WHERE h.installation_id = m.id
                ORDER BY h.received_at DESC
                LIMIT :per
            ) s
            WHERE NOT EXISTS (
                SELECT 1 FROM plugin_incidents i
                WHERE i.installation_id = m.id AND i.type = 'heartbeat_missed'
                  AND i.status NOT IN {CLOSED})
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
    count the repeat on it (its severity can only go up). True when a new one was opened."""
    row = await session.execute(
        text(
            f"""
            INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name,
                plugin_version, type, severity, status, first_bad_signal_at, telemetry_snapshot)
            VALUES (:installation, :tenant, :plugin, :version, :type, :severity, 'detected',
                    :first_bad, CAST(:snapshot AS jsonb))
            ON CONFLICT (installation_id, type) WHERE status NOT IN {CLOSED}
            DO UPDATE SET occurrences = plugin_incidents.occurrences + 1,
                          updated_at = now(),
                          severity = CASE
                              WHEN array_position(ARRAY['low','medium','high','critical'],
                                                  EXCLUDED.severity)
                                 > array_position(ARRAY['low','medium','high','critical'],
                                                  plugin_incidents.severity)
                              THEN EXCLUDED.severity ELSE plugin_incidents.severity END
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
            " WHERE installation_id = ANY(:ids) AND status = 'detected'"
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
            " updated_at = now(), status_reason = :reason"
            " WHERE id = ANY(:ids) AND status = 'detected'"
        ),
        {"ids": incident_ids, "reason": reason},
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
