"""Every SQL statement about notification endpoints (the outbox's are in delivery.py)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

_COLUMNS = "id, tenant_id, url, events, created_at, disabled_at"


@dataclass(frozen=True, slots=True)
class EndpointRow:
    """An endpoint as ops see it; the secret is never read back for display."""

    id: uuid.UUID
    tenant_id: str | None
    url: str
    events: list[str]
    created_at: datetime
    disabled_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "tenant": self.tenant_id,
            "url": self.url,
            "events": list(self.events),
            "created_at": self.created_at.isoformat(),
            "disabled_at": self.disabled_at.isoformat() if self.disabled_at else None,
        }


def _row(row: Any) -> EndpointRow:
    return EndpointRow(
        id=row.id,
        tenant_id=row.tenant_id,
        url=row.url,
        events=list(row.events),
        created_at=row.created_at,
        disabled_at=row.disabled_at,
    )


async def tenant_exists(session: AsyncSession, tenant_id: str) -> bool:
    found = await session.execute(text("SELECT 1 FROM tenants WHERE id = :id"), {"id": tenant_id})
    return found.first() is not None


async def insert_endpoint(
    session: AsyncSession,
    *,
    endpoint_id: uuid.UUID,
    tenant_id: str | None,
    url: str,
    secret_enc: bytes,
    events: Sequence[str],
) -> EndpointRow:
    row = await session.execute(
        text(
            "INSERT INTO notification_endpoints (id, tenant_id, url, secret_enc, events)"
            " VALUES (:id, :tenant, :url, :secret, CAST(:events AS jsonb))"
            f" RETURNING {_COLUMNS}"
        ),
        {
            "id": endpoint_id,
            "tenant": tenant_id,
            "url": url,
            "secret": secret_enc,
            "events": orjson.dumps(list(events)).decode(),
        },
    )
    return _row(row.one())


async def list_endpoints(session: AsyncSession) -> list[EndpointRow]:
    rows = await session.execute(
        text(
            f"SELECT {_COLUMNS} FROM notification_endpoints"
            " ORDER BY disabled_at IS NOT NULL, tenant_id NULLS FIRST, created_at, id"
        )
    )
    return [_row(row) for row in rows]


async def disable_endpoint(session: AsyncSession, endpoint_id: uuid.UUID) -> EndpointRow | None:
    """Idempotent: disabling twice keeps the first time."""
    row = await session.execute(
        text(
            "UPDATE notification_endpoints SET disabled_at = coalesce(disabled_at, now())"
            f" WHERE id = :id RETURNING {_COLUMNS}"
        ),
        {"id": endpoint_id},
    )
    found = row.first()
    return None if found is None else _row(found)


async def abandon_pending(session: AsyncSession, endpoint_id: uuid.UUID, reason: str) -> int:
    """Give up the endpoint's undelivered notifications (dead, with `reason`), so they stay
    as a record instead of being retried against a receiver ops turned off."""
    rows = await session.execute(
        text(
            "UPDATE outbox SET dead_at = now(), last_error = :reason"
            " WHERE endpoint_id = :id AND delivered_at IS NULL AND dead_at IS NULL"
            " RETURNING id"
        ),
        {"id": endpoint_id, "reason": reason},
    )
    return len(rows.all())
