"""SQL for ops users and their API tokens (app/ops/security.py holds the rules)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession


async def insert_user(
    session: AsyncSession,
    *,
    username: str,
    role: str,
    password_hash: str,
    tenants: list[str] | None = None,
) -> uuid.UUID | None:
    """The new user's id, or None when the name is taken. `tenants`: the user's scope (None:
    every tenant)."""
    row = await session.execute(
        text(
            "INSERT INTO ops_users (username, role, password_hash, tenants)"
            " VALUES (:u, :r, :h, :t)"
            " ON CONFLICT (username) DO NOTHING RETURNING id"
        ),
        {"u": username, "r": role, "h": password_hash, "t": tenants},
    )
    found: uuid.UUID | None = row.scalar_one_or_none()
    return found


async def insert_token(
    session: AsyncSession, user_id: uuid.UUID, token_hash: bytes, *, days: int | None = None
) -> datetime:
    """A new token valid `days` days (None: the column default, 90); its expiry."""
    row = await session.execute(
        text(
            "INSERT INTO ops_api_tokens (user_id, token_hash, expires_at)"
            " VALUES (:u, :h, coalesce(now() + make_interval(days => :d),"
            "  now() + interval '90 days')) RETURNING expires_at"
        ),
        {"u": user_id, "h": token_hash, "d": days},
    )
    expires_at: datetime = row.scalar_one()
    return expires_at


async def use_token(session: AsyncSession, token_hash: bytes) -> Row[Any] | None:
    """(id, username, role, tenants) of the enabled user whose live token this is, noting its
    use."""
    row = await session.execute(
        text(
            "UPDATE ops_api_tokens t SET last_used_at = now()"
            " FROM ops_users u"
            " WHERE t.token_hash = :h AND t.revoked_at IS NULL AND t.expires_at > now()"
            "  AND u.id = t.user_id AND u.disabled_at IS NULL"
            " RETURNING u.id, u.username, u.role, u.tenants"
        ),
        {"h": token_hash},
    )
    return row.first()


async def expired_token(session: AsyncSession, token_hash: bytes) -> datetime | None:
    """When this token expired, if it is an enabled user's token refused for its age only."""
    row = await session.execute(
        text(
            "SELECT t.expires_at FROM ops_api_tokens t JOIN ops_users u ON u.id = t.user_id"
            " WHERE t.token_hash = :h AND t.revoked_at IS NULL AND t.expires_at <= now()"
            "  AND u.disabled_at IS NULL"
        ),
        {"h": token_hash},
    )
    found: datetime | None = row.scalar_one_or_none()
    return found


async def revoke_token(session: AsyncSession, user_id: uuid.UUID, token_hash: bytes) -> int:
    """Revokes this token of the user if it is still live (1), else 0."""
    result = await session.execute(
        text(
            "UPDATE ops_api_tokens SET revoked_at = now()"
            " WHERE user_id = :u AND token_hash = :h AND revoked_at IS NULL RETURNING id"
        ),
        {"u": user_id, "h": token_hash},
    )
    return len(result.all())


async def lock_user_by_name(session: AsyncSession, username: str) -> Row[Any] | None:
    """(id, username, role, disabled_at) of the user of that name, locked for this
    transaction."""
    row = await session.execute(
        text(
            "SELECT id, username, role, disabled_at FROM ops_users WHERE username = :u FOR UPDATE"
        ),
        {"u": username},
    )
    return row.first()


async def user_by_name(session: AsyncSession, username: str) -> Row[Any] | None:
    """(id, username, role, password_hash, tenants) of the enabled user of that name, for a
    password sign-in."""
    row = await session.execute(
        text(
            "SELECT id, username, role, password_hash, tenants FROM ops_users"
            " WHERE username = :u AND disabled_at IS NULL"
        ),
        {"u": username},
    )
    return row.first()


async def list_users(session: AsyncSession) -> list[Row[Any]]:
    """Every ops user: (id, username, role, created_at, disabled_at, live_tokens,
    token_used_at, tenants, token_expires_at: the last expiry of a live token), by name.
    Never a password hash nor a token hash."""
    rows = await session.execute(
        text(
            "SELECT u.id, u.username, u.role, u.created_at, u.disabled_at, u.tenants,"
            " count(t.id) FILTER (WHERE t.revoked_at IS NULL AND t.expires_at > now())"
            "  AS live_tokens,"
            " max(t.last_used_at) AS token_used_at,"
            " max(t.expires_at) FILTER (WHERE t.revoked_at IS NULL AND t.expires_at > now())"
            "  AS token_expires_at"
            " FROM ops_users u LEFT JOIN ops_api_tokens t ON t.user_id = u.id"
            " GROUP BY u.id ORDER BY u.username"
        )
    )
    return list(rows.all())


async def lock_user(session: AsyncSession, user_id: uuid.UUID) -> Row[Any] | None:
    """(id, username, role, disabled_at, tenants) of the user, locked for this transaction."""
    row = await session.execute(
        text(
            "SELECT id, username, role, disabled_at, tenants FROM ops_users"
            " WHERE id = :u FOR UPDATE"
        ),
        {"u": user_id},
    )
    return row.first()


async def lock_enabled_admins(session: AsyncSession) -> list[uuid.UUID]:
    """The ids of the enabled admins, locked (two admins demoting each other at once wait
    for one another)."""
    rows = await session.execute(
        text(
            "SELECT id FROM ops_users WHERE role = 'admin' AND disabled_at IS NULL"
            " ORDER BY id FOR UPDATE"
        )
    )
    return list(rows.scalars().all())


async def set_role(session: AsyncSession, user_id: uuid.UUID, role: str) -> None:
    await session.execute(
        text("UPDATE ops_users SET role = :r WHERE id = :u"), {"u": user_id, "r": role}
    )


async def set_tenants(session: AsyncSession, user_id: uuid.UUID, tenants: list[str] | None) -> None:
    await session.execute(
        text("UPDATE ops_users SET tenants = :t WHERE id = :u"), {"u": user_id, "t": tenants}
    )


async def missing_tenants(session: AsyncSession, tenants: list[str]) -> list[str]:
    """The names in `tenants` that are no tenant's id (in the given order). The tenants found
    are key-share locked: none can be deleted before the caller's transaction ends."""
    rows = await session.execute(
        text("SELECT id FROM tenants WHERE id = ANY(:t) FOR KEY SHARE"), {"t": tenants}
    )
    found = set(rows.scalars().all())
    return [tenant for tenant in tenants if tenant not in found]


async def set_disabled(session: AsyncSession, user_id: uuid.UUID, *, disabled: bool) -> None:
    await session.execute(
        text(
            "UPDATE ops_users SET disabled_at = CASE WHEN :d THEN now() ELSE NULL END WHERE id = :u"
        ),
        {"u": user_id, "d": disabled},
    )


async def revoke_tokens(session: AsyncSession, user_id: uuid.UUID) -> int:
    """Revokes the user's live API tokens; how many there were."""
    result = await session.execute(
        text(
            "UPDATE ops_api_tokens SET revoked_at = now()"
            " WHERE user_id = :u AND revoked_at IS NULL RETURNING id"
        ),
        {"u": user_id},
    )
    return len(result.all())
