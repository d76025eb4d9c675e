"""Every SQL statement on maintenance windows but detection's (which reads the open ones,
app/incidents/repository.py). Windows are never deleted: ending one early rewrites its end."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

WINDOW_COLUMNS = (
    "id, tenant_id, installation_id, starts_at, ends_at, reason, created_by, created_at,"
    " (now() >= starts_at AND now() < ends_at) AS active"
)


@dataclass(frozen=True, slots=True)
class WindowFilter:
    """active: open now (True) or not (False); tenant: its windows and its installations';
    installation: the windows that cover it (its own and its tenant's). None: any.
    scope: the reader's tenants (their windows and their installations'); None: every one."""

    active: bool | None = None
    tenant: str | None = None
    installation: uuid.UUID | None = None
    scope: list[str] | None = None


# A window is in a user's scope (tenants; None: every tenant) when its tenant is, or its
# installation's tenant is.
_WINDOW_IN_SCOPE = (
    "(CAST(:scope AS text[]) IS NULL OR w.tenant_id = ANY(:scope) OR w.installation_id IN"
    " (SELECT sm.id FROM merchant_plugins sm WHERE sm.tenant_id = ANY(:scope)))"
)


async def database_now(session: AsyncSession) -> datetime:
    now: datetime = (await session.execute(text("SELECT now()"))).scalar_one()
    return now


async def tenant_exists(
    session: AsyncSession, tenant_id: str, *, scope: list[str] | None = None
) -> bool:
    """FOR KEY SHARE: the tenant cannot be deleted before the caller's transaction ends.
    False also for a tenant outside `scope` (the acting user's tenants; None: every one)."""
    found = await session.execute(
        text(
            "SELECT 1 FROM tenants WHERE id = :id"
            " AND (CAST(:scope AS text[]) IS NULL OR id = ANY(:scope)) FOR KEY SHARE"
        ),
        {"id": tenant_id, "scope": scope},
    )
    return found.first() is not None


async def installation_exists(
    session: AsyncSession, installation_id: uuid.UUID, *, scope: list[str] | None = None
) -> bool:
    """FOR KEY SHARE: the installation cannot be deleted before the caller's transaction ends.
    False also for an installation of a tenant outside `scope`."""
    found = await session.execute(
        text(
            "SELECT 1 FROM merchant_plugins WHERE id = :id"
            " AND (CAST(:scope AS text[]) IS NULL OR tenant_id = ANY(:scope)) FOR KEY SHARE"
        ),
        {"id": installation_id, "scope": scope},
    )
    return found.first() is not None


async def insert_window(
    session: AsyncSession,
    *,
    tenant_id: str | None,
    installation_id: uuid.UUID | None,
    starts_at: datetime,
    ends_at: datetime,
    reason: str,
    created_by: str,
) -> dict[str, Any]:
    row = await session.execute(
        text(
            "INSERT INTO maintenance_windows"
            " (tenant_id, installation_id, starts_at, ends_at, reason, created_by)"
            " VALUES (:tenant, :installation, :starts, :ends, :reason, :by)"
            f" RETURNING {WINDOW_COLUMNS}"
        ),
        {
            "tenant": tenant_id,
            "installation": installation_id,
            "starts": starts_at,
            "ends": ends_at,
            "reason": reason,
            "by": created_by,
        },
    )
    return dict(row.one()._mapping)


async def list_windows(
    session: AsyncSession, where: WindowFilter, *, limit: int
) -> list[dict[str, Any]]:
    """Newest first."""
    conditions = [_WINDOW_IN_SCOPE]
    params: dict[str, Any] = {"limit": limit, "scope": where.scope}
    if where.active is not None:
        open_now = "(now() >= w.starts_at AND now() < w.ends_at)"
        conditions.append(open_now if where.active else f"NOT {open_now}")
    if where.tenant is not None:
        conditions.append(
            "(w.tenant_id = :tenant OR w.installation_id IN"
            " (SELECT id FROM merchant_plugins WHERE tenant_id = :tenant))"
        )
        params["tenant"] = where.tenant
    if where.installation is not None:
        conditions.append(
            "(w.installation_id = :installation OR w.tenant_id ="
            " (SELECT tenant_id FROM merchant_plugins WHERE id = :installation))"
        )
        params["installation"] = where.installation
    rows = await session.execute(
        text(
            "SELECT w.id, w.tenant_id, w.installation_id, w.starts_at, w.ends_at, w.reason,"
            " w.created_by, w.created_at,"
            " (now() >= w.starts_at AND now() < w.ends_at) AS active"
            f" FROM maintenance_windows w WHERE {' AND '.join(conditions)}"
            " ORDER BY w.created_at DESC, w.id DESC LIMIT :limit"
        ),
        params,
    )
    return [dict(r._mapping) for r in rows]


async def end_window_now(
    session: AsyncSession, window_id: uuid.UUID, *, note: str, scope: list[str] | None = None
) -> dict[str, Any] | None:
    """End an open or scheduled window now, appending `note` to its reason; None when there is
    no such window (in `scope`) or it is already over. A window that had not started becomes a
    1 µs window ending now (ends_at > starts_at)."""
    row = await session.execute(
        text(
            "UPDATE maintenance_windows w SET"
            "  starts_at = CASE WHEN starts_at >= now()"
            "    THEN now() - interval '1 microsecond' ELSE starts_at END,"
            "  ends_at = now(),"
            "  reason = reason || :note"
            f" WHERE id = :id AND ends_at > now() AND {_WINDOW_IN_SCOPE}"
            f" RETURNING {WINDOW_COLUMNS}"
        ),
        {"id": window_id, "note": note, "scope": scope},
    )
    ended = row.first()
    return None if ended is None else dict(ended._mapping)


async def window_ends_at(
    session: AsyncSession, window_id: uuid.UUID, *, scope: list[str] | None = None
) -> datetime | None:
    """When the window ends (or ended); None when there is no such window (in `scope`)."""
    over = await session.execute(
        text(f"SELECT ends_at FROM maintenance_windows w WHERE id = :id AND {_WINDOW_IN_SCOPE}"),
        {"id": window_id, "scope": scope},
    )
    ends_at: datetime | None = over.scalar_one_or_none()
    return ends_at
