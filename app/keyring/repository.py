"""SQL of the key rotation: stored secrets not sealed under a key, read in id order (keyset
pages), and written back only if nobody changed them meanwhile (compare-and-swap)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.crypto import KEY_ID_BYTES

# The version byte and the key id every ciphertext starts with (app/core/crypto.py).
_PREFIX_BYTES = 1 + KEY_ID_BYTES


@dataclass(frozen=True, slots=True)
class Sealed:
    """One stored secret: its row id, what it is bound to, its ciphertext, and whether it can
    still be used (a plugin secret past its grace period cannot)."""

    id: Any
    bound_to: str
    sealed: bytes
    live: bool


async def plugin_secrets_not_under(
    session: AsyncSession, prefix: bytes, *, after: int, limit: int
) -> list[Sealed]:
    rows = await session.execute(
        text(
            "SELECT id, installation_id, secret_enc,"
            "  (expires_at IS NULL OR expires_at > now()) AS live"
            " FROM plugin_secrets"
            " WHERE id > :after AND substring(secret_enc FROM 1 FOR :n) <> :prefix"
            " ORDER BY id LIMIT :limit"
        ),
        {"after": after, "n": _PREFIX_BYTES, "prefix": prefix, "limit": limit},
    )
    return [Sealed(r.id, str(r.installation_id), bytes(r.secret_enc), r.live) for r in rows]


async def endpoint_secrets_not_under(
    session: AsyncSession, prefix: bytes, *, after: uuid.UUID, limit: int
) -> list[Sealed]:
    rows = await session.execute(
        text(
            "SELECT id, secret_enc FROM notification_endpoints"
            " WHERE id > :after AND substring(secret_enc FROM 1 FOR :n) <> :prefix"
            " ORDER BY id LIMIT :limit"
        ),
        {"after": after, "n": _PREFIX_BYTES, "prefix": prefix, "limit": limit},
    )
    return [Sealed(r.id, "", bytes(r.secret_enc), True) for r in rows]


async def swap_plugin_secrets(
    session: AsyncSession, changes: list[tuple[Any, bytes, bytes]]
) -> int:
    """Write (id, old, new) where the row still holds `old`; how many were written. Each
    change is announced to the API processes (NOTIFY selfheal_auth, migration 0003)."""
    if not changes:
        return 0
    result = await session.execute(
        text(
            "UPDATE plugin_secrets p SET secret_enc = v.new"
            " FROM unnest(CAST(:ids AS bigint[]), CAST(:olds AS bytea[]),"
            "  CAST(:news AS bytea[])) AS v(id, old, new)"
            " WHERE p.id = v.id AND p.secret_enc = v.old RETURNING p.id"
        ),
        _columns(changes),
    )
    return len(result.all())


async def swap_endpoint_secrets(
    session: AsyncSession, changes: list[tuple[Any, bytes, bytes]]
) -> int:
    """As swap_plugin_secrets, for notification endpoints."""
    if not changes:
        return 0
    result = await session.execute(
        text(
            "UPDATE notification_endpoints e SET secret_enc = v.new"
            " FROM unnest(CAST(:ids AS uuid[]), CAST(:olds AS bytea[]),"
            "  CAST(:news AS bytea[])) AS v(id, old, new)"
            " WHERE e.id = v.id AND e.secret_enc = v.old RETURNING e.id"
        ),
        _columns(changes),
    )
    return len(result.all())


def _columns(changes: list[tuple[Any, bytes, bytes]]) -> dict[str, list[Any]]:
    return {
        "ids": [c[0] for c in changes],
        "olds": [c[1] for c in changes],
        "news": [c[2] for c in changes],
    }


async def count_not_under(session: AsyncSession, prefix: bytes) -> tuple[int, int]:
    """(live plugin secrets, notification endpoints) still sealed under another key."""
    row = await session.execute(
        text(
            "SELECT"
            " (SELECT count(*) FROM plugin_secrets"
            "   WHERE substring(secret_enc FROM 1 FOR :n) <> :prefix"
            "   AND (expires_at IS NULL OR expires_at > now())),"
            " (SELECT count(*) FROM notification_endpoints"
            "   WHERE substring(secret_enc FROM 1 FOR :n) <> :prefix)"
        ),
        {"n": _PREFIX_BYTES, "prefix": prefix},
    )
    plugins, endpoints = row.one()
    return int(plugins), int(endpoints)
