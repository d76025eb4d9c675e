"""The statements a simulation runs in the control plane's database besides the domain's own
services (app/simulation/controlplane.py says when): retire the run's installations, lift a
quarantine left by an earlier run, give the demo operator a fresh password and token, and read
the outcomes of the run's tenants for the report and the progress view."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.states import ATTEMPT_IN_FLIGHT_SQL, INCIDENT_CLOSED_SQL

# --- the fleet and its releases --------------------------------------------------------------


async def disable_installations(session: AsyncSession, tenants: Sequence[str]) -> int:
    """The active installations of `tenants` disabled; how many."""
    result = await session.execute(
        text(
            "UPDATE merchant_plugins SET status = 'disabled', updated_at = now()"
            " WHERE tenant_id = ANY(:tenants) AND status = 'active'"
        ),
        {"tenants": list(tenants)},
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def unquarantine_versions(session: AsyncSession, plugin: str, versions: list[str]) -> None:
    await session.execute(
        text(
            "UPDATE plugin_releases SET quarantined_at = NULL, quarantine_reason = NULL"
            " WHERE plugin_name = :plugin AND version = ANY(:versions)"
            " AND quarantined_at IS NOT NULL"
        ),
        {"plugin": plugin, "versions": versions},
    )


async def release_states(session: AsyncSession, plugin: str) -> list[Any]:
    """(version, quarantined, quarantine_reason) of each of the plugin's releases."""
    rows = await session.execute(
        text(
            "SELECT version, quarantined_at IS NOT NULL AS quarantined, quarantine_reason"
            " FROM plugin_releases WHERE plugin_name = :plugin"
        ),
        {"plugin": plugin},
    )
    return list(rows)


# --- the demo operator -----------------------------------------------------------------------


async def lock_user(session: AsyncSession, username: str) -> uuid.UUID | None:
    """The user's id, row-locked for this transaction; None when there is no such user."""
    found: uuid.UUID | None = (
        await session.execute(
            text("SELECT id FROM ops_users WHERE username = :u FOR UPDATE"), {"u": username}
        )
    ).scalar_one_or_none()
    return found


async def reset_admin(session: AsyncSession, user_id: uuid.UUID, password_hash: str) -> None:
    """A new password; the user is an enabled admin again."""
    await session.execute(
        text(
            "UPDATE ops_users SET password_hash = :h, role = 'admin', disabled_at = NULL"
            " WHERE id = :id"
        ),
        {"h": password_hash, "id": user_id},
    )


async def replace_tokens(session: AsyncSession, user_id: uuid.UUID, token_hash: bytes) -> None:
    """Revoke the user's API tokens and give it one new token (its digest)."""
    await session.execute(
        text(
            "UPDATE ops_api_tokens SET revoked_at = now()"
            " WHERE user_id = :id AND revoked_at IS NULL"
        ),
        {"id": user_id},
    )
    await session.execute(
        text("INSERT INTO ops_api_tokens (user_id, token_hash) VALUES (:u, :h)"),
        {"u": user_id, "h": token_hash},
    )


# --- outcomes --------------------------------------------------------------------------------

_INCIDENT_COLUMNS = (
    "id, installation_id, tenant_id, type, severity, status, detected_at,"
    " resolved_at, first_bad_signal_at, status_reason,"
    " sira_decision->>'source' AS source, sira_decision->>'action' AS action,"
    " sira_decision->>'fallback_reason' AS fallback_reason"
)


async def incidents_of(session: AsyncSession, tenants: Sequence[str]) -> list[Any]:
    """The incidents of `tenants`, oldest first."""
    rows = await session.execute(
        text(
            f"SELECT {_INCIDENT_COLUMNS}"
            " FROM plugin_incidents WHERE tenant_id = ANY(:tenants) ORDER BY detected_at"
        ),
        {"tenants": list(tenants)},
    )
    return list(rows)


async def fleet_incidents_since(session: AsyncSession, plugin: str, since: float) -> list[Any]:
    """The plugin's fleet incidents (no installation) detected since `since` (epoch seconds),
    oldest first."""
    rows = await session.execute(
        text(
            f"SELECT {_INCIDENT_COLUMNS}"
            " FROM plugin_incidents WHERE installation_id IS NULL AND plugin_name = :plugin"
            " AND detected_at >= to_timestamp(:since) ORDER BY detected_at"
        ),
        {"plugin": plugin, "since": since},
    )
    return list(rows)


async def attempts_of(session: AsyncSession, tenants: Sequence[str]) -> list[Any]:
    """The attempts on the installations of `tenants`, oldest first."""
    rows = await session.execute(
        text(
            "SELECT a.id, a.incident_id, a.installation_id, a.action, a.from_version,"
            " a.to_version, a.status, a.automatic, a.created_at, a.finished_at,"
            " a.decision_source, a.failure_reason"
            " FROM plugin_autopatch_attempts a"
            " JOIN merchant_plugins m ON m.id = a.installation_id"
            " WHERE m.tenant_id = ANY(:tenants) ORDER BY a.created_at"
        ),
        {"tenants": list(tenants)},
    )
    return list(rows)


async def work_in_progress(session: AsyncSession, tenants: Sequence[str]) -> tuple[int, int]:
    """(open incidents, attempts in flight) on the installations of `tenants`."""
    row = (
        await session.execute(
            text(
                f"SELECT (SELECT count(*) FROM plugin_incidents WHERE tenant_id = ANY(:t)"
                f"         AND status NOT IN {INCIDENT_CLOSED_SQL}) AS open,"
                " (SELECT count(*) FROM plugin_autopatch_attempts a"
                "   JOIN merchant_plugins m ON m.id = a.installation_id"
                "   WHERE m.tenant_id = ANY(:t)"
                f"     AND a.status IN {ATTEMPT_IN_FLIGHT_SQL})"
                "  AS in_flight"
            ),
            {"t": list(tenants)},
        )
    ).one()
    return int(row.open), int(row.in_flight)
