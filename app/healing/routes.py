"""Ops routes of the healing loop (docs/contracts.md, "Ops API"): the attempts' list, and the
actions on an incident, approvals and manual actions. The loop that carries them out is this
package's; app/incidents only reads incidents."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request

from app.core import states
from app.core.errors import error_responses
from app.healing import actions
from app.healing.schemas import ApproveBody, Approved, ManualActionBody, ManualActionTaken
from app.incidents import queries
from app.incidents.routes import incident_key
from app.incidents.schemas import AttemptList
from app.ops.security import Operator, OpsUser, Viewer
from app.services import transaction

router = APIRouter(prefix="/api/ops", tags=["ops"], responses=error_responses(401, 429, 503))

AttemptStatus = Literal[
    "pending", "staging", "applying", "verifying", "success", "failed", "rolled_back", "cancelled"
]
assert set(AttemptStatus.__args__) == set(states.AttemptStatus)  # type: ignore[attr-defined]


def _acting(user: OpsUser) -> actions.ActingUser:
    return actions.ActingUser(user.id, user.username, user.scope)


# The statement is app/incidents/queries.py's `list_attempts`, not this package's: an
# incident's detail embeds the same list, and app/incidents cannot import app/healing (healing
# imports incidents; the import contracts forbid the cycle).
@router.get("/autopatch-attempts", response_model=AttemptList, responses=error_responses(422))
async def list_attempts(
    request: Request,
    user: Viewer,
    incident: uuid.UUID | None = None,
    plugin: Annotated[str | None, Query(max_length=100)] = None,
    status: AttemptStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AttemptList:
    async with transaction(request) as session:
        items = await queries.list_attempts(
            session,
            incident_id=incident,
            plugin=plugin,
            status=status,
            limit=limit,
            tenants=user.scope,
        )
    return AttemptList.model_validate({"items": items})


@router.post(
    "/plugin-incidents/{incident_id}/approve",
    response_model=Approved,
    responses=error_responses(403, 404, 409, 413, 422),
)
async def approve(
    incident_id: str, body: ApproveBody, request: Request, user: Operator
) -> Approved:
    """One vote for the exact action the incident waits to take (one per user; the user who
    asked for the action cannot approve it). The healing loop re-checks the gate at once."""
    key = incident_key(incident_id)
    async with transaction(request) as session:
        return await actions.approve(
            session, key, _acting(user), body.comment, action_key=body.action_key
        )


# exclude_unset: `action` is there for a patch or rollback only, as before.
@router.post(
    "/plugin-incidents/{incident_id}/manual-action",
    response_model=ManualActionTaken,
    response_model_exclude_unset=True,
    responses=error_responses(403, 404, 409, 413, 422),
)
async def manual_action(
    incident_id: str, body: ManualActionBody, request: Request, user: Operator
) -> ManualActionTaken:
    """patch or rollback: becomes the incident's pending action, taken by the healing loop
    through the policy gate, staging, apply and verification like any other (logged with the
    user). ignore, resolve and escalate take effect at once."""
    key = incident_key(incident_id)
    async with transaction(request) as session:
        return await actions.manual_action(
            session, key, _acting(user), body.action, body.patch_version, body.comment
        )
