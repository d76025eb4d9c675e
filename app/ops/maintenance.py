"""Maintenance windows and snoozes over the ops API (README, "Maintenance windows and
snoozes per installation or tenant suppress new incidents and are recorded").

While a window is open (starts_at <= now() < ends_at), detection opens no new incident for its
tenant or installation (app/incidents/repository.py). A snooze is a window starting now. Windows
are never deleted: ending one early sets its end to now and says who ended it in its reason, so
the table stays the record of why nothing was detected."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.db import set_actor
from app.core.errors import ApiError
from app.ops.security import OpsUser, require_role
from app.services import services

router = APIRouter(prefix="/api/ops", tags=["ops"])

MIN_DURATION_S = 60
MAX_DURATION_S = 30 * 86400
# A window opened through the API lasts at most this long and starts at most this far ahead
# (a forgotten multi-year window would silence detection unnoticed; SQL can still do it).
MAX_WINDOW = timedelta(seconds=MAX_DURATION_S)
MAX_START_AHEAD = timedelta(days=365)

WINDOW_COLUMNS = (
    "id, tenant_id, installation_id, starts_at, ends_at, reason, created_by, created_at,"
    " (now() >= starts_at AND now() < ends_at) AS active"
)


class WindowCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant_id: Annotated[str, Field(strict=True, min_length=1, max_length=200)] | None = None
    installation_id: uuid.UUID | None = None
    starts_at: AwareDatetime | None = None
    ends_at: AwareDatetime | None = None
    duration_s: Annotated[int, Field(strict=True, ge=MIN_DURATION_S, le=MAX_DURATION_S)] | None = (
        None
    )
    reason: Annotated[str, Field(strict=True, min_length=1, max_length=500)]

    @field_validator("reason")
    @classmethod
    def _reason_says_something(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("blank", "must not be blank")
        return value.strip()


class Window(BaseModel):
    id: uuid.UUID
    tenant_id: str | None
    installation_id: uuid.UUID | None
    starts_at: datetime
    ends_at: datetime
    reason: str
    created_by: str
    created_at: datetime
    active: bool


class WindowList(BaseModel):
    items: list[Window]


def _invalid(message: str, field: str | None) -> ApiError:
    return ApiError(422, "validation_error", message, field=field)


def _target(body: WindowCreate) -> None:
    if body.tenant_id is not None and body.installation_id is not None:
        raise _invalid("give tenant_id or installation_id, not both", "installation_id")
    if body.tenant_id is None and body.installation_id is None:
        raise _invalid("give tenant_id or installation_id: the window's target", "tenant_id")
    if body.ends_at is not None and body.duration_s is not None:
        raise _invalid("give ends_at or duration_s, not both", "duration_s")
    if body.ends_at is None and body.duration_s is None:
        raise _invalid("give ends_at or duration_s: when the window ends", "ends_at")


def _span(body: WindowCreate, now: datetime) -> tuple[datetime, datetime]:
    """The window's (starts_at, ends_at), checked against the database's clock."""
    starts_at = body.starts_at or now
    if starts_at - now > MAX_START_AHEAD:
        raise _invalid(f"starts_at is more than {MAX_START_AHEAD.days} days ahead", "starts_at")
    end_field = "ends_at" if body.ends_at is not None else "duration_s"
    if body.ends_at is not None:
        ends_at = body.ends_at
    else:
        assert body.duration_s is not None
        try:
            ends_at = starts_at + timedelta(seconds=body.duration_s)
        except OverflowError:
            raise _invalid("the window ends out of range", end_field) from None
    if ends_at <= now:
        raise _invalid(
            f"the window would end at {ends_at.isoformat()}, which is in the past", end_field
        )
    if ends_at <= starts_at:
        raise _invalid("ends_at must be after starts_at", end_field)
    if ends_at - starts_at > MAX_WINDOW:
        raise _invalid(f"a window lasts at most {MAX_WINDOW.days} days", end_field)
    return starts_at, ends_at


async def _check_target_exists(session: AsyncSession, body: WindowCreate) -> None:
    # FOR KEY SHARE: the target cannot be deleted before the window referencing it commits.
    if body.tenant_id is not None:
        found = await session.execute(
            text("SELECT 1 FROM tenants WHERE id = :id FOR KEY SHARE"), {"id": body.tenant_id}
        )
        if found.first() is None:
            raise ApiError(404, "not_found", f"no such tenant: {body.tenant_id}", field="tenant_id")
    else:
        found = await session.execute(
            text("SELECT 1 FROM merchant_plugins WHERE id = :id FOR KEY SHARE"),
            {"id": body.installation_id},
        )
        if found.first() is None:
            raise ApiError(
                404,
                "not_found",
                f"no such installation: {body.installation_id}",
                field="installation_id",
            )


@router.post("/maintenance-windows", status_code=201)
async def create_window(
    body: WindowCreate,
    request: Request,
    user: Annotated[OpsUser, Depends(require_role("operator"))],
) -> Window:
    """Open (or schedule) a window for one tenant or one installation. A snooze is a window
    starting now: give only duration_s."""
    _target(body)
    async with services(request).sessionmaker() as session, session.begin():
        now: datetime = (await session.execute(text("SELECT now()"))).scalar_one()
        starts_at, ends_at = _span(body, now)
        await _check_target_exists(session, body)
        await set_actor(session, f"user:{user.username}")
        row = await session.execute(
            text(
                "INSERT INTO maintenance_windows"
                " (tenant_id, installation_id, starts_at, ends_at, reason, created_by)"
                " VALUES (:tenant, :installation, :starts, :ends, :reason, :by)"
                f" RETURNING {WINDOW_COLUMNS}"
            ),
            {
                "tenant": body.tenant_id,
                "installation": body.installation_id,
                "starts": starts_at,
                "ends": ends_at,
                "reason": body.reason,
                "by": f"user:{user.username}",
            },
        )
        return Window.model_validate(dict(row.one()._mapping))


@router.get("/maintenance-windows")
async def list_windows(
    request: Request,
    _: Annotated[OpsUser, Depends(require_role("viewer"))],
    active: bool | None = None,
    tenant: Annotated[str | None, Query(max_length=200)] = None,
    installation: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> WindowList:
    """Newest first. active=true: open now; active=false: over or not started yet.
    tenant=: the tenant's windows and its installations'; installation=: the windows that
    cover it (its own and its tenant's)."""
    conditions = ["TRUE"]
    params: dict[str, Any] = {"limit": limit}
    if active is not None:
        open_now = "(now() >= w.starts_at AND now() < w.ends_at)"
        conditions.append(open_now if active else f"NOT {open_now}")
    if tenant is not None:
        conditions.append(
            "(w.tenant_id = :tenant OR w.installation_id IN"
            " (SELECT id FROM merchant_plugins WHERE tenant_id = :tenant))"
        )
        params["tenant"] = tenant
    if installation is not None:
        conditions.append(
            "(w.installation_id = :installation OR w.tenant_id ="
            " (SELECT tenant_id FROM merchant_plugins WHERE id = :installation))"
        )
        params["installation"] = installation
    async with services(request).sessionmaker() as session, session.begin():
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
        return WindowList(items=[Window.model_validate(dict(r._mapping)) for r in rows])


@router.post("/maintenance-windows/{window_id}/end")
async def end_window(
    window_id: str,
    request: Request,
    user: Annotated[OpsUser, Depends(require_role("operator"))],
) -> Window:
    """End an open or scheduled window now. The row stays, with who ended it in its reason;
    a window that had not started becomes a 1 µs window ending now (ends_at > starts_at)."""
    try:
        key = uuid.UUID(window_id)
    except ValueError:
        raise ApiError(404, "not_found", "no such maintenance window") from None
    actor = f"user:{user.username}"
    async with services(request).sessionmaker() as session, session.begin():
        await set_actor(session, actor)
        row = await session.execute(
            text(
                "UPDATE maintenance_windows SET"
                "  starts_at = CASE WHEN starts_at >= now()"
                "    THEN now() - interval '1 microsecond' ELSE starts_at END,"
                "  ends_at = now(),"
                "  reason = reason || :note"
                " WHERE id = :id AND ends_at > now()"
                f" RETURNING {WINDOW_COLUMNS}"
            ),
            {"id": key, "note": f" (ended early by {actor})"},
        )
        ended = row.first()
        if ended is not None:
            return Window.model_validate(dict(ended._mapping))
        over = await session.execute(
            text("SELECT ends_at FROM maintenance_windows WHERE id = :id"), {"id": key}
        )
        ends_at = over.scalar_one_or_none()
    if ends_at is None:
        raise ApiError(404, "not_found", "no such maintenance window")
    raise ApiError(
        409, "conflict", f"this window is already over (it ended at {ends_at.isoformat()})"
    )
