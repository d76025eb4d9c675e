"""Maintenance windows and snoozes over the ops API (README, "Ops API"); the rules are in
service.py."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.core.errors import error_responses
from app.maintenance import service
from app.maintenance.repository import WindowFilter
from app.maintenance.schemas import Window, WindowCreate, WindowList
from app.ops.security import Operator, Viewer
from app.services import transaction

router = APIRouter(prefix="/api/ops", tags=["ops"], responses=error_responses(401, 429, 503))


# 404: the tenant or installation the body names does not exist.
@router.post(
    "/maintenance-windows",
    status_code=201,
    response_model=Window,
    responses=error_responses(403, 404, 413, 422),
)
async def create_window(body: WindowCreate, request: Request, user: Operator) -> Window:
    """Open (or schedule) a window for one tenant or one installation. A snooze is a window
    starting now: give only duration_s."""
    async with transaction(request) as session:
        return await service.create_window(
            session, body, actor=f"user:{user.username}", scope=user.scope
        )


@router.get("/maintenance-windows", response_model=WindowList, responses=error_responses(422))
async def list_windows(
    request: Request,
    user: Viewer,
    active: bool | None = None,
    tenant: Annotated[str | None, Query(max_length=200)] = None,
    installation: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> WindowList:
    """Newest first. active=true: open now; active=false: over or not started yet.
    tenant=: the tenant's windows and its installations'; installation=: the windows that
    cover it (its own and its tenant's)."""
    where = WindowFilter(active=active, tenant=tenant, installation=installation, scope=user.scope)
    async with transaction(request) as session:
        return await service.list_windows(session, where, limit=limit)


@router.post(
    "/maintenance-windows/{window_id}/end",
    response_model=Window,
    responses=error_responses(403, 404, 409, 422),
)
async def end_window(window_id: str, request: Request, user: Operator) -> Window:
    """End an open or scheduled window now. The row stays, with who ended it in its reason;
    a window that had not started becomes a 1 µs window ending now (ends_at > starts_at)."""
    async with transaction(request) as session:
        return await service.end_window(
            session, window_id, actor=f"user:{user.username}", scope=user.scope
        )
