"""The ops policy over the ops JSON API (docs/contracts.md, "Ops API"): GET /api/ops/policy for
viewers, PUT for admins."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.core.errors import error_responses
from app.ops.security import Admin, Viewer
from app.policy import service
from app.policy.schemas import Policy, PolicyUpdate
from app.services import transaction

router = APIRouter(prefix="/api/ops", tags=["ops"], responses=error_responses(401, 429, 503))


@router.get("/policy", response_model=Policy)
async def get_policy(request: Request, user: Viewer) -> Policy:
    """A tenant-scoped caller sees only their own tenants in the whitelist."""
    async with transaction(request) as session:
        return service.seen_by(await service.read_policy(session), user.scope)


@router.put("/policy", response_model=Policy, responses=error_responses(403, 413, 422))
async def put_policy(update: PolicyUpdate, request: Request, user: Admin) -> Policy:
    async with transaction(request) as session:
        # The audit trigger records this change under the ops user's name.
        return await service.change_policy(session, update, actor=f"user:{user.username}")
