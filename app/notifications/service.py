"""Notification endpoints: add (the secret is shown once), list, disable.

An endpoint's secret must be recoverable (we compute HMACs with it), so it is sealed with
SecretBox like the plugin secrets, bound to "notification-endpoint:<id>": a ciphertext
copied from another endpoint's row, or from a plugin's, does not open."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from app.core.crypto import SecretBox
from app.core.errors import Invalid, NotFound
from app.notifications import repository
from app.notifications.egress import WebhookPolicy
from app.notifications.events import EVENTS
from app.notifications.repository import EndpointRow


@dataclass(frozen=True, slots=True)
class IssuedEndpoint:
    endpoint: EndpointRow
    secret: str


def secret_binding(endpoint_id: uuid.UUID) -> str:
    return f"notification-endpoint:{endpoint_id}"


def open_secret(box: SecretBox, endpoint_id: uuid.UUID, sealed: bytes) -> str:
    return box.open(sealed, bound_to=secret_binding(endpoint_id))


def parse_events(raw: str | Iterable[str] | None) -> list[str]:
    """`a,b` or a list of names; empty means every event. Unknown names are refused rather
    than stored: a typo would otherwise be an endpoint that silently never hears anything."""
    if raw is None:
        return []
    names = raw.split(",") if isinstance(raw, str) else list(raw)
    events: list[str] = []
    for name in (item.strip() for item in names):
        if not name:
            continue
        if name not in EVENTS:
            raise Invalid(f"unknown event {name!r} (known: {', '.join(EVENTS)})")
        if name not in events:
            events.append(name)
    return events


async def add_endpoint(
    session: AsyncSession,
    box: SecretBox,
    *,
    url: str,
    policy: WebhookPolicy,
    tenant_id: str | None = None,
    events: str | Iterable[str] | None = None,
) -> IssuedEndpoint:
    """Create an endpoint; the returned secret is not stored in clear anywhere. A tenant must
    exist already: creating one here would turn a typo into a tenant nobody has. The URL must
    pass `policy` (app/notifications/egress.py: https in prod, a public destination unless
    allow-listed; its name is resolved now), else Invalid naming the field `url`."""
    policy.check_url_syntax(url)
    names = parse_events(events)
    if tenant_id is not None and not await repository.tenant_exists(session, tenant_id):
        raise NotFound(f"no tenant {tenant_id!r} (tenants come from `selfheal plugin register`)")
    await policy.check_url(url)
    endpoint_id = uuid.uuid4()
    secret = secrets.token_urlsafe(32)
    endpoint = await repository.insert_endpoint(
        session,
        endpoint_id=endpoint_id,
        tenant_id=tenant_id,
        url=url,
        secret_enc=box.seal(secret, bound_to=secret_binding(endpoint_id)),
        events=names,
    )
    return IssuedEndpoint(endpoint, secret)


async def list_endpoints(session: AsyncSession) -> list[EndpointRow]:
    return await repository.list_endpoints(session)


async def disable_endpoint(
    session: AsyncSession, endpoint_id: uuid.UUID
) -> tuple[EndpointRow, int]:
    """Stop notifying the endpoint: no new deliveries are queued for it, and the ones still
    waiting are given up (dead). Returns the endpoint and how many were given up."""
    endpoint = await repository.disable_endpoint(session, endpoint_id)
    if endpoint is None:
        raise NotFound(f"no notification endpoint {endpoint_id}")
    dropped = await repository.abandon_pending(session, endpoint_id, "endpoint disabled")
    return endpoint, dropped
