"""Notification events and their fan-out into the outbox.

`notify` is called by the healing loop inside the transaction that changes the incident
(transactional outbox, docs/decisions.md): the notification exists if and only if the change
committed, and no HTTP call ever runs while a transaction holds locks. Delivery is
`app.notifications.delivery`.

One outbox row per subscribed endpoint, not one row per event: each endpoint then has its own
retries, backoff and dead letter, so a receiver that is down delays nobody else.

The payload carries a fixed set of incident and attempt fields (the README documents them),
whatever the caller's mapping holds: what a tenant's endpoint receives is decided here, not
by whichever keys the healing loop happens to pass. A tenant's endpoint only ever receives
notifications about its own tenant's incidents; fleet incidents (no tenant) go to ops only."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal, get_args

from sqlalchemy.ext.asyncio import AsyncSession

from app.notifications import repository

Event = Literal[
    "incident_opened",
    "approval_needed",
    "patch_succeeded",
    "patch_failed",
    "rolled_back",
    "escalated",
    "cancelled",
]
EVENTS: Final[tuple[Event, ...]] = get_args(Event)

# The fields a receiver gets; anything else in the caller's mapping is not sent.
INCIDENT_FIELDS: Final = (
    "id",
    "type",
    "severity",
    "status",
    "status_reason",
    "tenant_id",
    "installation_id",
    "plugin_name",
    "plugin_version",
    "detected_at",
)
ATTEMPT_FIELDS: Final = (
    "id",
    "action",
    "from_version",
    "to_version",
    "status",
    "failure_reason",
    "rollback_reason",
)

_ICONS: Final[dict[str, str]] = {
    "incident_opened": ":rotating_light:",
    "approval_needed": ":raised_hand:",
    "patch_succeeded": ":white_check_mark:",
    "patch_failed": ":x:",
    "rolled_back": ":rewind:",
    "escalated": ":sos:",
    "cancelled": ":no_entry_sign:",
}
MAX_REASON_CHARS: Final = 200
MAX_DETAIL_CHARS: Final = 2000


def check_event(event: str) -> Event:
    for known in EVENTS:
        if known == event:
            return known
    raise ValueError(f"unknown notification event {event!r} (known: {', '.join(EVENTS)})")


async def notify(
    session: AsyncSession,
    event: str,
    *,
    incident: Mapping[str, Any],
    attempt: Mapping[str, Any] | None = None,
    detail: str | None = None,
) -> int:
    """Queue `event` for every enabled endpoint subscribed to it: all ops endpoints (tenant
    NULL) and the endpoints of the incident's tenant. Runs in the caller's transaction and
    only writes; returns the number of deliveries queued (0 when nobody listens)."""
    name = check_event(event)
    payload = build_payload(name, incident=incident, attempt=attempt, detail=detail)
    tenant_id = incident.get("tenant_id")
    return await repository.queue_notifications(
        session,
        event=name,
        payload=payload,
        tenant_id=None if tenant_id is None else str(tenant_id),
    )


def build_payload(
    event: Event,
    *,
    incident: Mapping[str, Any],
    attempt: Mapping[str, Any] | None,
    detail: str | None,
    occurred_at: datetime | None = None,
) -> dict[str, Any]:
    """The stored payload; `delivery_id` is added when it is sent (it is the outbox id)."""
    incident_json = {key: _jsonable(incident.get(key)) for key in INCIDENT_FIELDS}
    attempt_json = (
        None if attempt is None else {key: _jsonable(attempt.get(key)) for key in ATTEMPT_FIELDS}
    )
    detail = _clean(detail, MAX_DETAIL_CHARS) if detail else None
    return {
        "event": event,
        "occurred_at": (occurred_at or datetime.now(UTC)).isoformat(),
        "incident": incident_json,
        "attempt": attempt_json,
        "detail": detail,
        "text": summary_text(event, incident_json, attempt_json, detail),
    }


def summary_text(
    event: str,
    incident: Mapping[str, Any],
    attempt: Mapping[str, Any] | None,
    detail: str | None,
) -> str:
    """One line a chat tool shows as it is (Slack's `text`), e.g.
    `:rewind: [high] error_spike on acme/payments 1.2.2: rolled back to 1.2.2 (health check
    failed)`. `<`, `>` and `&` are escaped as Slack requires, so a reason cannot inject a
    mention or a link."""
    attempt = attempt or {}
    tenant = incident.get("tenant_id")
    plugin = incident.get("plugin_name") or "?"
    where = f"{tenant}/{plugin}" if tenant else f"{plugin} (fleet)"
    if incident.get("plugin_version"):
        where += f" {incident['plugin_version']}"
    reason = detail or incident.get("status_reason")
    if event == "incident_opened":
        what = "incident opened"
    elif event == "approval_needed":
        what = "approval needed"
        if attempt.get("to_version"):
            what += f" to {attempt.get('action') or 'patch'} to {attempt['to_version']}"
    elif event == "patch_succeeded":
        verb = "rolled back" if attempt.get("action") == "rollback" else "patched"
        what = f"{verb} to {attempt.get('to_version') or '?'}, healthy"
        reason = detail
    elif event == "patch_failed":
        verb = "rollback" if attempt.get("action") == "rollback" else "patch"
        what = f"{verb} to {attempt.get('to_version') or '?'} failed"
        reason = attempt.get("failure_reason") or reason
    elif event == "rolled_back":
        what = f"rolled back to {attempt.get('from_version') or 'the previous version'}"
        reason = attempt.get("rollback_reason") or reason
    elif event == "escalated":
        what = "escalated to ops"
    else:  # cancelled
        what = "cancelled"
    line = f"{_ICONS.get(event, ':bell:')} [{incident.get('severity') or '?'}] "
    line += f"{incident.get('type') or 'incident'} on {where}: {what}"
    if reason:
        line += f" ({_clean(str(reason), MAX_REASON_CHARS)})"
    return _slack_escape(line)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return str(value)


def _clean(value: str, limit: int) -> str:
    """One line, no NUL (jsonb refuses it), at most `limit` characters."""
    flat = " ".join(value.replace("\x00", "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _slack_escape(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
