"""The statements /health and /metrics read: on a plain connection (no transaction of their
own to manage), read-only, through indexed columns, so a scrape stays cheap."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.core.states import ATTEMPT_IN_FLIGHT_SQL, INCIDENT_OPEN_SQL


async def overdue_installations(conn: AsyncConnection, *, grace_s: int) -> int:
    """Active installations whose next heartbeat is more than `grace_s` late."""
    overdue: int = (
        await conn.execute(
            text(
                "SELECT count(*) FROM merchant_plugins"
                " WHERE status = 'active' AND next_expected_at < now() - make_interval(secs => :grace)"
            ),
            {"grace": grace_s},
        )
    ).scalar_one()
    return overdue


async def open_incident_counts(conn: AsyncConnection) -> list[tuple[str, str, int]]:
    """(status, severity, count) of the open incidents."""
    rows = await conn.execute(
        text(
            "SELECT status, severity, count(*) FROM plugin_incidents"
            f" WHERE status IN {INCIDENT_OPEN_SQL} GROUP BY status, severity"
        )
    )
    return [(status, severity, count) for status, severity, count in rows]


async def in_flight_attempt_counts(conn: AsyncConnection) -> list[tuple[str, int]]:
    """(status, count) of the attempts under way."""
    rows = await conn.execute(
        text(
            "SELECT status, count(*) FROM plugin_autopatch_attempts"
            f" WHERE status IN {ATTEMPT_IN_FLIGHT_SQL} GROUP BY status"
        )
    )
    return [(status, count) for status, count in rows]


async def undelivered_outbox_counts(conn: AsyncConnection) -> list[tuple[str, str, int]]:
    """(kind, 'waiting' or 'dead', count) of the outbox rows not delivered."""
    rows = await conn.execute(
        text(
            "SELECT kind, CASE WHEN dead_at IS NULL THEN 'waiting' ELSE 'dead' END,"
            " count(*) FROM outbox WHERE delivered_at IS NULL GROUP BY 1, 2"
        )
    )
    return [(kind, state, count) for kind, state, count in rows]
