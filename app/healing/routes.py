"""Ops routes of the healing loop (docs/contracts.md, "Ops API"): the attempts' list, and the
actions on an incident, approvals and manual actions. The loop that carries them out is this
package's; app/incidents only reads incidents."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from app.core import names, states
from app.core.errors import ApiError
from app.healing import actions
from app.incidents import queries
from app.ops.security import OpsUser, require_role
from app.services import services

router = APIRouter(prefix="/api/ops", tags=["ops"])

AttemptStatus = Literal[
    "pending", "staging", "applying", "verifying", "success", "failed", "rolled_back", "cancelled"
]
assert set(AttemptStatus.__args__) == set(states.AttemptStatus)  # type: ignore[attr-defined]


class ApproveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    comment: Annotated[str | None, Field(max_length=2000)] = None


class ManualActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: actions.ManualAction
    patch_version: Annotated[str | None, Field(max_length=128, pattern=names.VERSION_PATTERN)] = (
        None
    )
    comment: Annotated[str | None, Field(max_length=2000)] = None


def _incident_key(incident_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(incident_id)
    except ValueError:
        raise ApiError(404, "not_found", "no such incident") from None


def _refused(refused: actions.ActionRefused) -> ApiError:
    code = {403: "forbidden", 404: "not_found", 409: "conflict"}.get(
        refused.status, "validation_error"
    )
    return ApiError(refused.status, code, refused.message, field=refused.field)


# The statement is app/incidents/queries.py's `list_attempts`, not this package's: an
# incident's detail embeds the same list, and app/incidents cannot import app/healing (healing
# imports incidents; the import contracts forbid the cycle).
@router.get("/autopatch-attempts")
async def list_attempts(
    request: Request,
    _: Annotated[OpsUser, Depends(require_role("viewer"))],
    incident: uuid.UUID | None = None,
    plugin: Annotated[str | None, Query(max_length=100)] = None,
    status: AttemptStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    async with services(request).sessionmaker() as session, session.begin():
        items = await queries.list_attempts(
            session, incident_id=incident, plugin=plugin, status=status, limit=limit
        )
    return {"items": items}


@router.post("/plugin-incidents/{incident_id}/approve")
async def approve(
    incident_id: str,
    body: ApproveBody,
    request: Request,
    user: Annotated[OpsUser, Depends(require_role("operator"))],
) -> dict[str, Any]:
    """One vote for the exact action the incident waits to take (one per user; the user who
    asked for the action cannot approve it). The healing loop re-checks the gate at once."""
    key = _incident_key(incident_id)
    try:
        async with services(request).sessionmaker() as session, session.begin():
            return await actions.approve(
                session, key, actions.Operator(user.id, user.username), body.comment
            )
    except actions.ActionRefused as refused:
        raise _refused(refused) from None


@router.post("/plugin-incidents/{incident_id}/manual-action")
async def manual_action(
    incident_id: str,
    body: ManualActionBody,
    request: Request,
    user: Annotated[OpsUser, Depends(require_role("operator"))],
) -> dict[str, Any]:
    """patch or rollback: becomes the incident's pending action, taken by the healing loop
    through the policy gate, staging, apply and verification like any other (logged with the
    user). ignore, resolve and escalate take effect at once."""
    key = _incident_key(incident_id)
    try:
        async with services(request).sessionmaker() as session, session.begin():
            return await actions.manual_action(
                session,
                key,
                actions.Operator(user.id, user.username),
                body.action,
                body.patch_version,
                body.comment,
            )
    except actions.ActionRefused as refused:
        raise _refused(refused) from None
