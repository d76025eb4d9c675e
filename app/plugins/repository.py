"""Every SQL statement about installations, their secrets, their commands and the partitions of
their heartbeats (except the heartbeat hot path, which lives in ingest.py; retention.py runs
the partition calls)."""

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


# A failure the plugin calls retryable, of a command it may still be sent (the SET expressions
# of one UPDATE read the row it locked: a hand-out racing this one is seen).
_RETRY = (
    "(CAST(:retryable AS boolean) AND delivery_count < max_deliveries"
    " AND expires_at > now() AND held_at IS NULL)"
)


async def fail_command(
    session: AsyncSession,
    installation_id: uuid.UUID,
    command_id: uuid.UUID,
    error: str,
    retryable: bool,
) -> CommandState | None:
    """The plugin could not carry the command out. A `retryable` failure of a command with
    deliveries left (delivery_count < max_deliveries), not expired and not held by the kill
    switch, goes back to pending: the next heartbeat hands it out again, within the budget the
    healing loop gave it (its lifetime and delivery cap). Any other failure is final: failed,
    and the healing loop fails the attempt. The error and flag are recorded either way."""
    row = await session.execute(
        text(
            "UPDATE plugin_agent_commands SET"
            f"  status = CASE WHEN {_RETRY} THEN 'pending' ELSE 'failed' END,"
            f"  failed_at = CASE WHEN {_RETRY} THEN NULL ELSE now() END,"
            f"  lease_expires_at = CASE WHEN {_RETRY} THEN NULL ELSE lease_expires_at END,"
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


async def ensure_partitions(session: AsyncSession, *, span_hours: int, ahead_hours: int) -> int:
    """Make the missing heartbeat partitions from an hour behind now to `ahead_hours` ahead, as
    the owner (migration 0017); how many (app/plugins/retention.py)."""
    row = await session.execute(
        text("SELECT selfheal_ensure_heartbeat_partitions(:span, :ahead)"),
        {"span": span_hours, "ahead": ahead_hours},
    )
    return int(row.scalar_one())


async def drop_expired_partitions(session: AsyncSession, *, keep_days: int) -> list[str]:
    """Drop the heartbeat partitions whose whole range is older than `keep_days` and which hold
    no sample beyond the detector's watermark, as the owner (migration 0017); their names."""
    row = await session.execute(
        text(
            "SELECT selfheal_drop_heartbeat_partitions(:keep,"
            " (SELECT last_id FROM detector_watermarks WHERE name = 'samples'))"
        ),
        {"keep": keep_days},
    )
    return list(row.scalar_one())


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()
