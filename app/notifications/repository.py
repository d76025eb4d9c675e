"""Every SQL statement about notification endpoints and the outbox: the endpoints ops manage,
the rows `notify` and `record_outcome` queue in the caller's transaction, and the claim and
fenced outcome updates of a delivery pass (app/notifications/delivery.py says why they are
written so)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.decisions.schemas import Feedback

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


# --- the outbox: queueing (in the transaction that causes the row) ---------------------------


async def queue_notifications(
    session: AsyncSession, *, event: str, payload: dict[str, Any], tenant_id: str | None
) -> int:
    """One outbox row per enabled endpoint subscribed to `event`: every ops endpoint (tenant
    NULL) and those of `tenant_id`. The number queued (0 when nobody listens)."""
    rows = await session.execute(
        text(
            """
            INSERT INTO outbox (kind, topic, payload, endpoint_id)
            SELECT 'notification', :event, CAST(:payload AS jsonb), e.id
            FROM notification_endpoints e
            WHERE e.disabled_at IS NULL
              AND (e.tenant_id IS NULL OR e.tenant_id = CAST(:tenant AS text))
              AND (e.events = '[]'::jsonb OR e.events @> jsonb_build_array(CAST(:event AS text)))
            RETURNING id
            """
        ),
        {"event": event, "payload": orjson.dumps(payload).decode(), "tenant": tenant_id},
    )
    return len(rows.all())


async def insert_learning_feedback(session: AsyncSession, feedback: Feedback) -> bool:
    """Record an attempt's outcome in sira_learning_feedback; False when the attempt's outcome
    is already there (the unique key on attempt_id: a concurrent caller waits for the first to
    commit, then inserts nothing)."""
    inserted = await session.execute(
        text(
            """
            INSERT INTO sira_learning_feedback
                (incident_id, attempt_id, incident_type, plugin_name, from_version,
                 to_version, decision_source, confidence, outcome, tenant_id)
            VALUES (CAST(:incident_id AS uuid), CAST(:attempt_id AS uuid), :incident_type,
                    :plugin_name, :from_version, :to_version, :decision_source, :confidence,
                    :outcome, :tenant_id)
            ON CONFLICT (attempt_id) DO NOTHING
            RETURNING id
            """
        ),
        {
            "incident_id": feedback.incident_id,
            "attempt_id": feedback.attempt_id,
            "incident_type": feedback.incident_type,
            "plugin_name": feedback.plugin,
            "from_version": feedback.from_version,
            "to_version": feedback.to_version,
            "decision_source": feedback.decision_source,
            "confidence": feedback.confidence,
            "outcome": feedback.outcome,
            "tenant_id": feedback.tenant_id,
        },
    )
    return inserted.first() is not None


async def queue_feedback(session: AsyncSession, *, topic: str, payload: dict[str, Any]) -> None:
    """One outbox row for the decision service (no endpoint)."""
    await session.execute(
        text(
            "INSERT INTO outbox (kind, topic, payload)"
            " VALUES ('feedback', :topic, CAST(:payload AS jsonb))"
        ),
        {"topic": topic, "payload": orjson.dumps(payload).decode()},
    )


# --- the outbox: delivery (claim, then one fenced outcome per row) ---------------------------


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    """An outbox row a delivery pass claimed."""

    id: int
    kind: str
    topic: str
    payload: dict[str, Any]
    attempts: int
    endpoint_id: uuid.UUID | None
    lease_until: datetime  # our claim's fencing token


@dataclass(frozen=True, slots=True)
class DeliveryEndpoint:
    url: str
    secret_enc: bytes
    disabled: bool


async def claim_due(
    session: AsyncSession, *, limit: int, lease_s: float, include_feedback: bool
) -> list[ClaimedRow]:
    """At most `limit` due rows (neither delivered nor dead, next_attempt_at passed; feedback
    rows only with `include_feedback`), FOR UPDATE SKIP LOCKED, their next_attempt_at pushed
    `lease_s` forward: the lease, and the fencing token of the outcome updates. In id order."""
    claimed = await session.execute(
        text(
            """
            WITH due AS (
                SELECT id FROM outbox
                WHERE delivered_at IS NULL AND dead_at IS NULL AND next_attempt_at <= now()
                  AND (CAST(:feedback AS boolean) OR kind = 'notification')
                ORDER BY next_attempt_at, id
                LIMIT :limit
                FOR UPDATE SKIP LOCKED
            )
            UPDATE outbox o SET next_attempt_at = now() + make_interval(secs => :lease)
            FROM due WHERE o.id = due.id
            RETURNING o.id, o.kind, o.topic, o.payload, o.attempts, o.endpoint_id,
                      o.next_attempt_at
            """
        ),
        {"feedback": include_feedback, "limit": limit, "lease": float(lease_s)},
    )
    return sorted(
        (
            ClaimedRow(
                id=r.id,
                kind=r.kind,
                topic=r.topic,
                payload=r.payload if isinstance(r.payload, dict) else {},
                attempts=r.attempts,
                endpoint_id=r.endpoint_id,
                lease_until=r.next_attempt_at,
            )
            for r in claimed
        ),
        key=lambda row: row.id,
    )


async def endpoints_for_delivery(
    session: AsyncSession, endpoint_ids: list[uuid.UUID]
) -> dict[uuid.UUID, DeliveryEndpoint]:
    """The URL, sealed secret and disabled flag of each of these endpoints that exists."""
    found = await session.execute(
        text(
            "SELECT id, url, secret_enc, disabled_at IS NOT NULL AS disabled"
            " FROM notification_endpoints WHERE id = ANY(:ids)"
        ),
        {"ids": endpoint_ids},
    )
    return {e.id: DeliveryEndpoint(e.url, bytes(e.secret_enc), e.disabled) for e in found}


# Each outcome applies only while next_attempt_at still holds the value our claim wrote: a
# pass that overran its lease cannot overwrite the outcome of the pass that took the row over.
_FENCED = " WHERE id = :id AND next_attempt_at = :lease AND delivered_at IS NULL"


async def mark_delivered(session: AsyncSession, row: ClaimedRow) -> None:
    await session.execute(
        text("UPDATE outbox SET delivered_at = now(), attempts = attempts + 1" + _FENCED),
        {"id": row.id, "lease": row.lease_until},
    )


async def mark_dead(
    session: AsyncSession, row: ClaimedRow, *, error: str | None, attempted: bool
) -> None:
    """Given up, keeping `error`; `attempted`: a request was made, and counts as an attempt."""
    await session.execute(
        text(
            "UPDATE outbox SET dead_at = now(), last_error = :error, attempts = attempts + :tried"
            + _FENCED
        ),
        {"id": row.id, "lease": row.lease_until, "error": error, "tried": int(attempted)},
    )


async def schedule_retry(
    session: AsyncSession, row: ClaimedRow, *, error: str | None, delay_s: float
) -> None:
    """A failed attempt: counted, `error` kept, due again in `delay_s`."""
    await session.execute(
        text(
            "UPDATE outbox SET attempts = attempts + 1, last_error = :error,"
            " next_attempt_at = now() + make_interval(secs => :delay)" + _FENCED
        ),
        {"id": row.id, "lease": row.lease_until, "error": error, "delay": delay_s},
    )


async def put_back(session: AsyncSession, row: ClaimedRow, *, delay_s: float) -> None:
    """No attempt was made (deferred): due again in `delay_s`, nothing counted."""
    await session.execute(
        text("UPDATE outbox SET next_attempt_at = now() + make_interval(secs => :delay)" + _FENCED),
        {"id": row.id, "lease": row.lease_until, "delay": delay_s},
    )
