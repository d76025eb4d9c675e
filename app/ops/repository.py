"""SQL for ops users and their API tokens (app/ops/security.py holds the rules)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession


async def insert_user(
    session: AsyncSession, *, username: str, role: str, password_hash: str
) -> uuid.UUID | None:
    """The new user's id, or None when the name is taken."""
    row = await session.execute(
        text(
            "INSERT INTO ops_users (username, role, password_hash) VALUES (:u, :r, :h)"
            " ON CONFLICT (username) DO NOTHING RETURNING id"
        ),
        {"u": username, "r": role, "h": password_hash},
    )
    found: uuid.UUID | None = row.scalar_one_or_none()
    return found


async def insert_token(session: AsyncSession, user_id: uuid.UUID, token_hash: bytes) -> None:
    await session.execute(
        text("INSERT INTO ops_api_tokens (user_id, token_hash) VALUES (:u, :h)"),
        {"u": user_id, "h": token_hash},
    )


async def use_token(session: AsyncSession, token_hash: bytes) -> Row[Any] | None:
    """(id, username, role) of the enabled user whose live token this is, noting its use."""
    row = await session.execute(
        text(
            "UPDATE ops_api_tokens t SET last_used_at = now()"
            " FROM ops_users u"
            " WHERE t.token_hash = :h AND t.revoked_at IS NULL"
            "  AND u.id = t.user_id AND u.disabled_at IS NULL"
            " RETURNING u.id, u.username, u.role"
        ),
        {"h": token_hash},
    )
    return row.first()


async def user_by_name(session: AsyncSession, username: str) -> Row[Any] | None:
    """(id, username, role, password_hash) of the enabled user of that name, for a password
    sign-in."""
    row = await session.execute(
        text(
            "SELECT id, username, role, password_hash FROM ops_users"
            " WHERE username = :u AND disabled_at IS NULL"
        ),
        {"u": username},
    )
    return row.first()


async def list_users(session: AsyncSession) -> list[Row[Any]]:
    """Every ops user: (id, username, role, created_at, disabled_at, live_tokens,
    token_used_at), by name. Never a password hash nor a token hash."""
    rows = await session.execute(
        text(
            "SELECT u.id, u.username, u.role, u.created_at, u.disabled_at,"
            " count(t.id) FILTER (WHERE t.revoked_at IS NULL) AS live_tokens,"
            " max(t.last_used_at) AS token_used_at"
            " FROM ops_users u LEFT JOIN ops_api_tokens t ON t.user_id = u.id"
            " GROUP BY u.id ORDER BY u.username"
        )
    )
    return list(rows.all())


async def lock_user(session: AsyncSession, user_id: uuid.UUID) -> Row[Any] | None:
    """(id, username, role, disabled_at) of the user, locked for this transaction."""
    row = await session.execute(
        text("SELECT id, username, role, disabled_at FROM ops_users WHERE id = :u FOR UPDATE"),
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
