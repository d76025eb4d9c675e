"""Ops read API over incidents and KPIs (docs/contracts.md, "Ops API"). The attempts' list is
served by app/healing/routes.py, next to the attempts."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.core.errors import Invalid, NotFound, error_responses
from app.core.models import IncidentType, Severity
from app.incidents import queries
from app.incidents.schemas import IncidentDetail, IncidentList, Kpis
from app.ops.security import Viewer
from app.services import transaction

router = APIRouter(prefix="/api/ops", tags=["ops"], responses=error_responses(401, 429, 503))


def incident_key(incident_id: str) -> uuid.UUID:
    """The incident id of a path; one that is not a UUID names no incident (404, not 422)."""
    try:
        return uuid.UUID(incident_id)
    except ValueError:
        raise NotFound("no such incident") from None


@router.get("/plugin-incidents", response_model=IncidentList, responses=error_responses(422))
async def list_incidents(
    request: Request,
    user: Viewer,
    status: Annotated[str | None, Query(max_length=40)] = None,
    severity: Severity | None = None,
    tenant: Annotated[str | None, Query(max_length=200)] = None,
    plugin: Annotated[str | None, Query(max_length=100)] = None,
    type: IncidentType | None = None,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> IncidentList:
    try:
        after = queries.decode_cursor(cursor) if cursor else None
    except queries.BadCursor as exc:
        raise Invalid(str(exc), field="cursor") from None
    async with transaction(request) as session:
        items = await queries.list_incidents(
            session,
            status=status,
            severity=severity,
            tenant=tenant,
            plugin=plugin,
            incident_type=type,
            after=after,
            limit=limit,
            tenants=user.scope,
        )
    next_cursor = (
        queries.encode_cursor(items[-1]["detected_at"], items[-1]["id"])
        if len(items) == limit
        else None
    )
    return IncidentList.model_validate({"items": items, "next_cursor": next_cursor})


# exclude_unset: `members` appears for a fleet incident only, `by` where an event has one.
@router.get(
    "/plugin-incidents/{incident_id}",
    response_model=IncidentDetail,
    response_model_exclude_unset=True,
    responses=error_responses(404, 422),
)
async def incident_detail(incident_id: str, request: Request, user: Viewer) -> IncidentDetail:
    """404 also for another tenant's incident when the caller is limited to some tenants (and
    for a fleet incident, which spans tenants)."""
    key = incident_key(incident_id)
    async with transaction(request) as session:
        incident = await queries.incident_detail(session, key, tenants=user.scope)
    if incident is None:
        raise NotFound("no such incident")
    return IncidentDetail.model_validate(incident)


@router.get("/kpis", response_model=Kpis, responses=error_responses(422))
async def kpis(
    request: Request, user: Viewer, days: Annotated[int, Query(ge=1, le=365)] = 7
) -> Kpis:
    """Over the caller's tenants only when they are limited to some."""
    async with transaction(request) as session:
        return Kpis.model_validate(await queries.kpis(session, days=days, tenants=user.scope))
