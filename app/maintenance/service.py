"""Maintenance windows and snoozes (README, "Maintenance windows and snoozes per installation or
tenant suppress new incidents and are recorded").

While a window is open (starts_at <= now() < ends_at), detection opens no new incident for its
tenant or installation (app/incidents/repository.py). A snooze is a window starting now. Windows
are never deleted: ending one early sets its end to now and says who ended it in its reason, so
the table stays the record of why nothing was detected."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from app.core.db import set_actor
from app.core.errors import Conflict, Invalid, NotFound
from app.maintenance import repository
from app.maintenance.repository import WindowFilter
from app.maintenance.schemas import MAX_DURATION_S, Window, WindowCreate, WindowList

# A window opened through the API lasts at most this long and starts at most this far ahead
# (a forgotten multi-year window would silence detection unnoticed; SQL can still do it).
MAX_WINDOW = timedelta(seconds=MAX_DURATION_S)
MAX_START_AHEAD = timedelta(days=365)

NO_SUCH_WINDOW = "no such maintenance window"


def _check_target(body: WindowCreate) -> None:
    """One target (tenant or installation) and one end (ends_at or duration_s)."""
    if body.tenant_id is not None and body.installation_id is not None:
        raise Invalid("give tenant_id or installation_id, not both", field="installation_id")
    if body.tenant_id is None and body.installation_id is None:
        raise Invalid("give tenant_id or installation_id: the window's target", field="tenant_id")
    if body.ends_at is not None and body.duration_s is not None:
        raise Invalid("give ends_at or duration_s, not both", field="duration_s")
    if body.ends_at is None and body.duration_s is None:
        raise Invalid("give ends_at or duration_s: when the window ends", field="ends_at")


def _window_span(body: WindowCreate, now: datetime) -> tuple[datetime, datetime]:
    """The window's (starts_at, ends_at), checked against the database's clock."""
    starts_at = body.starts_at or now
    if starts_at - now > MAX_START_AHEAD:
        raise Invalid(
            f"starts_at is more than {MAX_START_AHEAD.days} days ahead", field="starts_at"
        )
    end_field = "ends_at" if body.ends_at is not None else "duration_s"
    if body.ends_at is not None:
        ends_at = body.ends_at
    else:
        assert body.duration_s is not None
        try:
            ends_at = starts_at + timedelta(seconds=body.duration_s)
        except OverflowError:
            raise Invalid("the window ends out of range", field=end_field) from None
    if ends_at <= now:
        raise Invalid(
            f"the window would end at {ends_at.isoformat()}, which is in the past",
            field=end_field,
        )
    if ends_at <= starts_at:
        raise Invalid("ends_at must be after starts_at", field=end_field)
    if ends_at - starts_at > MAX_WINDOW:
        raise Invalid(f"a window lasts at most {MAX_WINDOW.days} days", field=end_field)
    return starts_at, ends_at


async def _check_target_exists(
    session: AsyncSession, body: WindowCreate, scope: list[str] | None
) -> None:
    # Key-share locked: the target cannot be deleted before the window referencing it commits.
    # Outside the acting user's scope, a target does not exist for them.
    if body.tenant_id is not None:
        if not await repository.tenant_exists(session, body.tenant_id, scope=scope):
            raise NotFound(f"no such tenant: {body.tenant_id}", field="tenant_id")
    else:
        assert body.installation_id is not None
        if not await repository.installation_exists(session, body.installation_id, scope=scope):
            raise NotFound(f"no such installation: {body.installation_id}", field="installation_id")


async def create_window(
    session: AsyncSession, body: WindowCreate, *, actor: str, scope: list[str] | None = None
) -> Window:
    """Open (or schedule) a window for one tenant or one installation; a snooze gives only
    duration_s. The body is checked before the database is asked anything (the session
    connects on its first statement). `scope`: the acting user's tenants (None: every one)."""
    _check_target(body)
    starts_at, ends_at = _window_span(body, await repository.database_now(session))
    await _check_target_exists(session, body, scope)
    await set_actor(session, actor)
    row = await repository.insert_window(
        session,
        tenant_id=body.tenant_id,
        installation_id=body.installation_id,
        starts_at=starts_at,
        ends_at=ends_at,
        reason=body.reason,
        created_by=actor,
    )
    return Window.model_validate(row)


async def list_windows(session: AsyncSession, where: WindowFilter, *, limit: int) -> WindowList:
    rows = await repository.list_windows(session, where, limit=limit)
    return WindowList(items=[Window.model_validate(row) for row in rows])


async def end_window(
    session: AsyncSession, window_id: str, *, actor: str, scope: list[str] | None = None
) -> Window:
    """End an open or scheduled window now; the row stays, with who ended it in its reason.
    NotFound for an unknown id (or a window outside `scope`, the acting user's tenants),
    Conflict for a window already over."""
    try:
        key = uuid.UUID(window_id)
    except ValueError:
        raise NotFound(NO_SUCH_WINDOW) from None
    await set_actor(session, actor)
    ended = await repository.end_window_now(
        session, key, note=f" (ended early by {actor})", scope=scope
    )
    if ended is not None:
        return Window.model_validate(ended)
    ends_at = await repository.window_ends_at(session, key, scope=scope)
    if ends_at is None:
        raise NotFound(NO_SUCH_WINDOW)
    raise Conflict(f"this window is already over (it ended at {ends_at.isoformat()})")
