"""Plugin identities and their commands: registration, secret rotation, ack and fail."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.core import names
from app.core.crypto import SecretBox, new_plugin_secret
from app.core.errors import Conflict, NotFound
from app.plugins import repository


@dataclass(frozen=True, slots=True)
class IssuedSecret:
    plugin_id: uuid.UUID
    secret: str


def check_registration(tenant: str, name: str, version: str, env: str) -> None:
    names.check(
        ("tenant", tenant, names.TENANT),
        ("name", name, names.PLUGIN),
        ("version", version, names.VERSION),
        ("env", env, names.ENV),
    )


async def register_installation(
    session: AsyncSession, box: SecretBox, *, tenant: str, name: str, version: str, env: str
) -> IssuedSecret:
    """Create the tenant if needed and an installation; the secret is returned once and
    stored only encrypted."""
    check_registration(tenant, name, version, env)
    await repository.ensure_tenant(session, tenant)
    installation_id = await repository.insert_installation(
        session, tenant_id=tenant, plugin_name=name, version=version, env=env
    )
    secret = new_plugin_secret()
    await repository.insert_secret(
        session, installation_id, box.seal(secret, bound_to=str(installation_id))
    )
    return IssuedSecret(installation_id, secret)


async def rotate_secret(
    session: AsyncSession, box: SecretBox, installation_id: uuid.UUID, *, grace_s: int
) -> IssuedSecret:
    """Issue a new secret; the current ones stay valid for `grace_s` seconds so plugins can
    switch without a failed heartbeat."""
    if not await repository.installation_exists(session, installation_id):
        raise NotFound(f"no installation {installation_id}")
    await repository.expire_current_secrets(session, installation_id, grace_s=grace_s)
    secret = new_plugin_secret()
    await repository.insert_secret(
        session, installation_id, box.seal(secret, bound_to=str(installation_id))
    )
    return IssuedSecret(installation_id, secret)


def _parse_command_id(command_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(command_id)
    except ValueError:
        raise NotFound("no such command") from None


async def acknowledge(
    session: AsyncSession, installation_id: uuid.UUID, command_id: str, result_json: str
) -> dict[str, Any]:
    state = await repository.ack_command(
        session, installation_id, _parse_command_id(command_id), result_json
    )
    if state is None:
        raise NotFound("no such command")
    if state.status != "acked":
        raise Conflict(f"command is {state.status}; it can no longer be acknowledged")
    return {"id": str(state.id), "status": state.status}


async def report_failure(
    session: AsyncSession, installation_id: uuid.UUID, command_id: str, error: str, retryable: bool
) -> dict[str, Any]:
    state = await repository.fail_command(
        session, installation_id, _parse_command_id(command_id), error, retryable
    )
    if state is None:
        raise NotFound("no such command")
    # pending: a retryable failure with deliveries left; the command is handed out again.
    if state.status not in ("failed", "pending"):
        raise Conflict(f"command is {state.status}; it can no longer fail")
    return {"id": str(state.id), "status": state.status}
