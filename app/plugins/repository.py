"""Every SQL statement about installations, their secrets, their commands and the retention
of their heartbeats (except the heartbeat hot path, which lives in ingest.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True, slots=True)
class CommandState:
    id: uuid.UUID
    status: str
    acked_at: datetime | None
    failed_at: datetime | None


async def ensure_tenant(session: AsyncSession, tenant_id: str, name: str | None = None) -> None:
    await session.execute(
        text("INSERT INTO tenants (id, name) VALUES (:id, :name) ON CONFLICT (id) DO NOTHING"),
        {"id": tenant_id, "name": name},
    )


async def insert_installation(
    session: AsyncSession, *, tenant_id: str, plugin_name: str, version: str, env: str
) -> uuid.UUID:
    row = await session.execute(
        text(
            "INSERT INTO merchant_plugins (tenant_id, plugin_name, plugin_version, env)"
            " VALUES (:tenant, :name, :version, :env) RETURNING id"
        ),
        {"tenant": tenant_id, "name": plugin_name, "version": version, "env": env},
    )
    installation_id: uuid.UUID = row.scalar_one()
    return installation_id


async def installation_exists(session: AsyncSession, installation_id: uuid.UUID) -> bool:
    row = await session.execute(
        text("SELECT 1 FROM merchant_plugins WHERE id = :id FOR UPDATE"), {"id": installation_id}
    )
    return row.first() is not None


async def insert_secret(session: AsyncSession, installation_id: uuid.UUID, sealed: bytes) -> None:
    await session.execute(
        text("INSERT INTO plugin_secrets (installation_id, secret_enc) VALUES (:id, :sealed)"),
        {"id": installation_id, "sealed": sealed},
    )


async def expire_current_secrets(
    session: AsyncSession, installation_id: uuid.UUID, *, grace_s: int
) -> None:
    """Old secrets stay valid for the grace period (or less, if they already expire sooner)."""
    await session.execute(
        text(
            "UPDATE plugin_secrets SET expires_at = LEAST("
            "  coalesce(expires_at, 'infinity'), now() + make_interval(secs => :grace))"
            " WHERE installation_id = :id AND (expires_at IS NULL OR expires_at > now())"
        ),
        {"id": installation_id, "grace": grace_s},
    )


async def ack_command(
    session: AsyncSession, installation_id: uuid.UUID, command_id: uuid.UUID, result_json: str
) -> CommandState | None:
    row = await session.execute(
        text(
            "UPDATE plugin_agent_commands SET status = 'acked', acked_at = now(),"
            "  result = CAST(:result AS jsonb)"
            " WHERE id = :id AND installation_id = :plugin AND status IN ('pending', 'delivered')"
            " RETURNING id, status, acked_at, failed_at"
        ),
        {"id": command_id, "plugin": installation_id, "result": result_json},
    )
    found = row.first()
    return (
        CommandState(*found) if found else await command_state(session, installation_id, command_id)
    )


async def fail_command(
    session: AsyncSession,
    installation_id: uuid.UUID,
    command_id: uuid.UUID,
    error: str,
    retryable: bool,
) -> CommandState | None:
    row = await session.execute(
        text(
            "UPDATE plugin_agent_commands SET status = 'failed', failed_at = now(),"
            "  error = :error, retryable = :retryable"
            " WHERE id = :id AND installation_id = :plugin AND status IN ('pending', 'delivered')"
            " RETURNING id, status, acked_at, failed_at"
        ),
        {"id": command_id, "plugin": installation_id, "error": error, "retryable": retryable},
    )
    found = row.first()
    return (
        CommandState(*found) if found else await command_state(session, installation_id, command_id)
    )


async def command_state(
    session: AsyncSession, installation_id: uuid.UUID, command_id: uuid.UUID
) -> CommandState | None:
    """A plugin sees only its own commands: another plugin's command reads as missing."""
    row = await session.execute(
        text(
            "SELECT id, status, acked_at, failed_at FROM plugin_agent_commands"
            " WHERE id = :id AND installation_id = :plugin"
        ),
        {"id": command_id, "plugin": installation_id},
    )
    found = row.first()
    return CommandState(*found) if found else None


async def insert_command(
    session: AsyncSession,
    *,
    installation_id: uuid.UUID,
    type: str,
    payload: dict[str, Any],
    automatic: bool,
    ttl_s: int,
    max_deliveries: int,
    attempt_id: uuid.UUID | None = None,
) -> uuid.UUID | None:
    """Queue a command for one installation; its id.

    With `attempt_id` (the healing loop's update and rollback commands): one command of each
    type per attempt (uq_plugin_agent_commands_attempt_type), so a step that runs twice queues
    it once; None when the attempt already has one. Without (a command queued by hand): NULL
    attempt ids never conflict, so the id is always returned. `automatic`: the loop queued it
    on its own; the kill switch holds such commands back."""
    row = await session.execute(
        text(
            """
            INSERT INTO plugin_agent_commands (installation_id, attempt_id, type, payload,
                automatic, expires_at, max_deliveries)
            VALUES (:installation, :attempt, :type, CAST(:payload AS jsonb), :automatic,
                    now() + make_interval(secs => :ttl), :max_deliveries)
            ON CONFLICT ON CONSTRAINT uq_plugin_agent_commands_attempt_type DO NOTHING
            RETURNING id
            """
        ),
        {
            "installation": installation_id,
            "attempt": attempt_id,
            "type": type,
            "payload": _json(payload),
            "automatic": automatic,
            "ttl": ttl_s,
            "max_deliveries": max_deliveries,
        },
    )
    command_id: uuid.UUID | None = row.scalar_one_or_none()
    return command_id


async def delete_old_heartbeats(session: AsyncSession, *, retention_days: int, batch: int) -> int:
    """Delete at most `batch` samples older than `retention_days`, oldest first through the
    received_at index, never one the detector has not read yet (beyond its watermark); SKIP
    LOCKED: concurrent prunes split the rows. The number deleted."""
    result = await session.execute(
        text(
            """
            DELETE FROM plugin_heartbeats WHERE id IN (
                SELECT id FROM plugin_heartbeats
                WHERE received_at < now() - make_interval(days => :days)
                  AND id <= (SELECT last_id FROM detector_watermarks
                             WHERE name = 'samples')
                ORDER BY received_at
                LIMIT :batch
                FOR UPDATE SKIP LOCKED)
            """
        ),
        {"days": retention_days, "batch": batch},
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()
