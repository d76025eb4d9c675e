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
