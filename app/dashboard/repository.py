"""SQL for dashboard sessions (`ops_sessions`; app/dashboard/sessions.py holds the rules)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession


async def insert_session(
    session: AsyncSession, *, id_hash: bytes, user_id: uuid.UUID, csrf_token: str
) -> None:
    await session.execute(
        text("INSERT INTO ops_sessions (id_hash, user_id, csrf_token) VALUES (:h, :u, :c)"),
        {"h": id_hash, "u": user_id, "c": csrf_token},
    )


async def delete_expired_sessions(
    session: AsyncSession, user_id: uuid.UUID, *, idle_s: int, max_s: int
) -> None:
    """The user's sessions past either timeout (a sign-in tidies up after the user)."""
    await session.execute(
        text(
            "DELETE FROM ops_sessions WHERE user_id = :u"
            " AND (last_seen_at < now() - make_interval(secs => :idle)"
            "  OR created_at < now() - make_interval(secs => :max))"
        ),
        {"u": user_id, "idle": idle_s, "max": max_s},
    )


async def use_session(
    session: AsyncSession, id_hash: bytes, *, idle_s: int, max_s: int, touch: bool
) -> Row[Any] | None:
    """The live session of an enabled user: (user_id, username, role, tenants, csrf_token,
    flash), the flash taken (cleared) and, with `touch`, last_seen_at moved to now. None when
    there is no such session, or it is past a timeout (then it is deleted)."""
    row = (
        await session.execute(
            text(
                "SELECT s.user_id, u.username, u.role, u.tenants, s.csrf_token, s.flash,"
                " (s.last_seen_at >= now() - make_interval(secs => :idle)"
                "  AND s.created_at >= now() - make_interval(secs => :max)"
                "  AND u.disabled_at IS NULL) AS live"
                " FROM ops_sessions s JOIN ops_users u ON u.id = s.user_id"
                " WHERE s.id_hash = :h FOR UPDATE OF s"
            ),
            {"h": id_hash, "idle": idle_s, "max": max_s},
        )
    ).first()
    if row is None:
        return None
    if not row.live:
        await delete_session(session, id_hash)
        return None
    if touch or row.flash is not None:
        await session.execute(
            text(
                "UPDATE ops_sessions SET flash = NULL,"
                " last_seen_at = CASE WHEN :touch THEN now() ELSE last_seen_at END"
                " WHERE id_hash = :h"
            ),
            {"h": id_hash, "touch": touch},
        )
    return row


async def set_flash(session: AsyncSession, id_hash: bytes, message: str) -> None:
    await session.execute(
        text("UPDATE ops_sessions SET flash = :m WHERE id_hash = :h"),
        {"h": id_hash, "m": message},
    )


async def delete_session(session: AsyncSession, id_hash: bytes) -> None:
    await session.execute(text("DELETE FROM ops_sessions WHERE id_hash = :h"), {"h": id_hash})


async def delete_user_sessions(session: AsyncSession, user_id: uuid.UUID) -> int:
    """Ends every session of the user; how many there were."""
    result = await session.execute(
        text("DELETE FROM ops_sessions WHERE user_id = :u RETURNING user_id"), {"u": user_id}
    )
    return len(result.all())
