"""Ops identities: argon2id passwords, SHA-256-stored API tokens, and the role check every ops
endpoint declares through `require_role`, or through the aliases Viewer, Operator and Admin."""

from __future__ import annotations

import functools
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import structlog
from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.crypto import new_api_token, token_digest
from app.core.db import set_actor
from app.core.errors import ApiError, Conflict, Invalid, NotFound, Refused
from app.core.models import ROLES
from app.ops import repository
from app.services import transaction

_RANK = {role: rank for rank, role in enumerate(ROLES)}
# The names ops_users accepts (its check constraint ck_ops_users_username).
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
log = structlog.get_logger("selfheal.ops")
_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters


@dataclass(frozen=True, slots=True)
class OpsUser:
    id: uuid.UUID
    username: str
    role: str

    def can(self, role: str) -> bool:
        return _RANK[self.role] >= _RANK[role]


@dataclass(frozen=True, slots=True)
class NewUser:
    username: str
    role: str
    password: str
    token: str


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except VerificationError:
        return False


async def add_user(session: AsyncSession, username: str, role: str) -> NewUser:
    if role not in _RANK:
        raise Invalid(f"--role must be one of {', '.join(ROLES)}", field="role")
    if not USERNAME.fullmatch(username):
        raise Invalid(
            f"{username!r} is not a valid user name (1 to 64 letters, digits, ._@-, starting"
            " with a letter or digit)",
            field="username",
        )
    password = secrets.token_urlsafe(18)
    token = new_api_token()
    user_id = await repository.insert_user(
        session, username=username, role=role, password_hash=hash_password(password)
    )
    if user_id is None:
        raise Conflict(f"user {username!r} already exists")
    await repository.insert_token(session, user_id, token_digest(token))
    return NewUser(username=username, role=role, password=password, token=token)


@dataclass(frozen=True, slots=True)
class UserListing:
    """One ops user as the admin's list shows them: never a password or token hash."""

    id: uuid.UUID
    username: str
    role: str
    created_at: datetime
    disabled_at: datetime | None
    live_tokens: int
    token_used_at: datetime | None


async def list_users(session: AsyncSession) -> list[UserListing]:
    return [
        UserListing(
            r.id, r.username, r.role, r.created_at, r.disabled_at, r.live_tokens, r.token_used_at
        )
        for r in await repository.list_users(session)
    ]


async def _target(session: AsyncSession, user_id: uuid.UUID | str) -> Any:
    try:
        key = user_id if isinstance(user_id, uuid.UUID) else uuid.UUID(user_id)
    except ValueError:
        raise NotFound("no such user") from None
    found = await repository.lock_user(session, key)
    if found is None:
        raise NotFound("no such user")
    return found


async def change_role(
    session: AsyncSession, by: OpsUser, user_id: uuid.UUID | str, role: str
) -> OpsUser:
    """Gives the user `role` (an admin's act); returns the user. An admin cannot
    change their own role (so the last admin cannot demote themself), and the last enabled
    admin keeps the role."""
    if role not in _RANK:
        raise Invalid(f"the role must be one of {', '.join(ROLES)}", field="role")
    await set_actor(session, f"user:{by.username}")
    admins = await repository.lock_enabled_admins(session)
    target = await _target(session, user_id)
    if target.id == by.id:
        raise Refused("you cannot change your own role; another admin can")
    if target.role == role:
        raise Conflict(f"{target.username} is already {role}")
    if target.role == "admin" and role != "admin" and set(admins) <= {target.id}:
        raise Refused(f"{target.username} is the last enabled admin")
    await repository.set_role(session, target.id, role)
    log.info(
        "ops_user_role_changed", actor=by.username, user=target.username, old=target.role, new=role
    )
    return OpsUser(target.id, target.username, role)


async def disable_user(session: AsyncSession, by: OpsUser, user_id: uuid.UUID | str) -> OpsUser:
    """Disables the user and revokes their API tokens (their dashboard sessions stop counting;
    the dashboard also deletes them); returns the user. Nobody disables themself, and
    the last enabled admin stays."""
    await set_actor(session, f"user:{by.username}")
    admins = await repository.lock_enabled_admins(session)
    target = await _target(session, user_id)
    if target.id == by.id:
        raise Refused("you cannot disable yourself; another admin can")
    if target.disabled_at is not None:
        raise Conflict(f"{target.username} is already disabled")
    if target.role == "admin" and set(admins) <= {target.id}:
        raise Refused(f"{target.username} is the last enabled admin")
    await repository.set_disabled(session, target.id, disabled=True)
    revoked = await repository.revoke_tokens(session, target.id)
    log.info("ops_user_disabled", actor=by.username, user=target.username, tokens_revoked=revoked)
    return OpsUser(target.id, target.username, target.role)


async def enable_user(session: AsyncSession, by: OpsUser, user_id: uuid.UUID | str) -> OpsUser:
    """Lets a disabled user sign in again with their password; the API tokens revoked when
    they were disabled stay revoked. Returns the user."""
    await set_actor(session, f"user:{by.username}")
    target = await _target(session, user_id)
    if target.disabled_at is None:
        raise Conflict(f"{target.username} is not disabled")
    await repository.set_disabled(session, target.id, disabled=False)
    log.info("ops_user_enabled", actor=by.username, user=target.username)
    return OpsUser(target.id, target.username, target.role)


async def user_for_token(session: AsyncSession, token: str) -> OpsUser | None:
    found = await repository.use_token(session, token_digest(token))
    return OpsUser(found.id, found.username, found.role) if found else None


# Verified against when the name is unknown, so that a wrong name costs the same argon2 time
# as a wrong password and the answer's timing does not tell which names exist.
@functools.cache
def _no_user_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(18))


async def user_for_password(session: AsyncSession, username: str, password: str) -> OpsUser | None:
    """The enabled user with this name and password (argon2id), else None."""
    found = await repository.user_by_name(session, username) if username else None
    if found is None:
        verify_password(_no_user_hash(), password)
        return None
    if not verify_password(found.password_hash, password):
        return None
    return OpsUser(found.id, found.username, found.role)


def require_role(role: str) -> Callable[[Request], Awaitable[OpsUser]]:
    """FastAPI dependency: a valid bearer token of at least `role`, else 401 / 403."""

    async def dependency(request: Request) -> OpsUser:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "unauthorized",
                "Authorization: Bearer <token> is required",
                headers={"WWW-Authenticate": "Bearer"},
            )
        async with transaction(request) as session:
            user = await user_for_token(session, token.strip())
        if user is None:
            raise ApiError(
                401,
                "unauthorized",
                "invalid or revoked token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not user.can(role):
            raise ApiError(403, "forbidden", f"this needs the {role} role; you are {user.role}")
        request.state.ops_user = user
        return user

    return dependency


# The dependency aliases a route declares its caller with: `user: Operator`.
Viewer = Annotated[OpsUser, Depends(require_role("viewer"))]
Operator = Annotated[OpsUser, Depends(require_role("operator"))]
Admin = Annotated[OpsUser, Depends(require_role("admin"))]
