"""Ops identities: argon2id passwords, SHA-256-stored API tokens, and the role check every ops
endpoint declares through `require_role`, or through the aliases Viewer, Operator and Admin."""

from __future__ import annotations

import functools
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.crypto import new_api_token, token_digest
from app.core.errors import ApiError, Conflict, Invalid
from app.core.models import ROLES
from app.ops import repository
from app.services import transaction

_RANK = {role: rank for rank, role in enumerate(ROLES)}
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
    password = secrets.token_urlsafe(18)
    token = new_api_token()
    user_id = await repository.insert_user(
        session, username=username, role=role, password_hash=hash_password(password)
    )
    if user_id is None:
        raise Conflict(f"user {username!r} already exists")
    await repository.insert_token(session, user_id, token_digest(token))
    return NewUser(username=username, role=role, password=password, token=token)


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
