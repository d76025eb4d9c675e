"""The ops JSON API (docs/contracts.md, "Ops API"). Bearer tokens; viewer < operator < admin."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from app.core.db import set_actor
from app.core.errors import ApiError
from app.ops import repository
from app.ops.schemas import Policy, PolicyUpdate
from app.ops.security import OpsUser, require_role
from app.services import services

router = APIRouter(prefix="/api/ops", tags=["ops"])


@router.get("/policy")
async def get_policy(request: Request, _: OpsUser = Depends(require_role("viewer"))) -> Policy:
    async with services(request).sessionmaker() as session, session.begin():
        return Policy.model_validate(await repository.read_policy(session))


@router.put("/policy")
async def put_policy(
    update: PolicyUpdate, request: Request, user: OpsUser = Depends(require_role("admin"))
) -> Policy:
    changes = update.model_dump(exclude_unset=True)
    if not changes:
        raise ApiError(422, "validation_error", "give at least one policy field to change")
    async with services(request).sessionmaker() as session, session.begin():
        # The audit trigger records this change under the ops user's name.
        await set_actor(session, f"user:{user.username}")
        return Policy.model_validate(await repository.update_policy(session, changes))
