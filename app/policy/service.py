"""The ops policy as ops read and change it (the API's GET and PUT /api/ops/policy). The gate's
own reads are in gate.py; every statement is in repository.py."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from app.core.db import set_actor
from app.core.errors import Invalid
from app.policy import repository
from app.policy.schemas import Policy, PolicyUpdate


async def read_policy(session: AsyncSession) -> Policy:
    return Policy.model_validate(await repository.read_policy(session))


def seen_by(policy: Policy, tenants: list[str] | None) -> Policy:
    """The policy as a user limited to `tenants` (None: every tenant) sees it: the whitelist
    names only their tenants; the others' are not theirs to know. The policy itself is global:
    only an admin, who is never tenant-scoped, changes it."""
    if tenants is None:
        return policy
    return policy.model_copy(
        update={"autopatch_whitelist": [t for t in policy.autopatch_whitelist if t in tenants]}
    )


async def change_policy(session: AsyncSession, update: PolicyUpdate, *, actor: str) -> Policy:
    """Set the fields given, and only those; the audit trigger records the change under
    `actor`. Invalid when no field is given."""
    changes = update.model_dump(exclude_unset=True)
    if not changes:
        raise Invalid("give at least one policy field to change")
    await set_actor(session, actor)
    return Policy.model_validate(await repository.update_policy(session, changes))
