"""Ops read API over incidents and KPIs (docs/contracts.md, "Ops API"). The attempts' list is
served by app/healing/routes.py, next to the attempts."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from app.core.errors import ApiError
from app.core.models import INCIDENT_TYPES, SEVERITIES
from app.incidents import queries
from app.ops.security import OpsUser, require_role
from app.services import services

router = APIRouter(prefix="/api/ops", tags=["ops"])

Severity = Literal["low", "medium", "high", "critical"]
IncidentType = Literal[
    "heartbeat_missed", "error_spike", "webhook_fail_rate", "crash_loop", "regression"
]
assert set(Severity.__args__) == set(SEVERITIES)  # type: ignore[attr-defined]
assert set(IncidentType.__args__) == set(INCIDENT_TYPES)  # type: ignore[attr-defined]


@router.get("/plugin-incidents")
async def list_incidents(
    request: Request,
    _: Annotated[OpsUser, Depends(require_role("viewer"))],
    status: Annotated[str | None, Query(max_length=40)] = None,
    severity: Severity | None = None,
    tenant: Annotated[str | None, Query(max_length=200)] = None,
    plugin: Annotated[str | None, Query(max_length=100)] = None,
    type: IncidentType | None = None,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    try:
        after = queries.decode_cursor(cursor) if cursor else None
    except queries.BadCursor as exc:
        raise ApiError(422, "validation_error", str(exc), field="cursor") from None
    async with services(request).sessionmaker() as session, session.begin():
        items = await queries.list_incidents(
            session,
            status=status,
            severity=severity,
            tenant=tenant,
            plugin=plugin,
            incident_type=type,
            after=after,
            limit=limit,
        )
    next_cursor = (
        queries.encode_cursor(items[-1]["detected_at"], items[-1]["id"])
        if len(items) == limit
        else None
    )
    return {"items": items, "next_cursor": next_cursor}


@router.get("/plugin-incidents/{incident_id}")
async def incident_detail(
    incident_id: str, request: Request, _: Annotated[OpsUser, Depends(require_role("viewer"))]
) -> dict[str, Any]:
    try:
        key = uuid.UUID(incident_id)
    except ValueError:
        raise ApiError(404, "not_found", "no such incident") from None
    async with services(request).sessionmaker() as session, session.begin():
        incident = await queries.incident_detail(session, key)
    if incident is None:
        raise ApiError(404, "not_found", "no such incident")
    return incident


@router.get("/kpis")
async def kpis(
    request: Request,
    _: Annotated[OpsUser, Depends(require_role("viewer"))],
    days: Annotated[int, Query(ge=1, le=365)] = 7,
) -> dict[str, Any]:
    async with services(request).sessionmaker() as session, session.begin():
        return await queries.kpis(session, days=days)
