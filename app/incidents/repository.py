"""SQL of incident detection. Each statement touches only what is due: the overdue
installations through the next_expected_at index, the open incidents through their status
index. Deduplication is the partial unique index on open (installation, type) incidents: a
second detector, or the same one running twice, inserts nothing."""

from __future__ import annotations

import uuid

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
    detected_at - first_bad_signal_at is the detection delay."""
    rows = await session.execute(
        text(
            f"""
            INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, plugin_version,
                type, severity, status, first_bad_signal_at, telemetry_snapshot)
            SELECT m.id, m.tenant_id, m.plugin_name, m.plugin_version, 'heartbeat_missed',
                'medium', 'detected', m.next_expected_at + make_interval(secs => :grace),
                jsonb_build_object(
                    'last_heartbeat_at', m.last_heartbeat_at,
                    'next_expected_at', m.next_expected_at,
                    'heartbeat_count', m.heartbeat_count,
                    'telemetry', m.telemetry)
            FROM merchant_plugins m
            WHERE m.next_expected_at < now() - make_interval(secs => :grace)
              AND m.status = 'active'
              AND NOT EXISTS (
                  SELECT 1 FROM plugin_incidents i
                  WHERE i.installation_id = m.id AND i.type = 'heartbeat_missed'
                    AND i.status NOT IN {CLOSED})
            ORDER BY m.next_expected_at
            LIMIT :limit
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
