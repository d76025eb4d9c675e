"""Ops identities: argon2id passwords, SHA-256-stored API tokens, and the role check every ops
endpoint declares through `require_role`."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from fastapi import Request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.crypto import new_api_token, token_digest
from app.core.errors import ApiError
from app.core.models import ROLES
from app.services import services

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
        raise ValueError(f"--role must be one of {', '.join(ROLES)}")
    password = secrets.token_urlsafe(18)
    token = new_api_token()
    row = await session.execute(
        text(
            "INSERT INTO ops_users (username, role, password_hash) VALUES (:u, :r, :h)"
            " ON CONFLICT (username) DO NOTHING RETURNING id"
        ),
        {"u": username, "r": role, "h": hash_password(password)},
    )
    user_id = row.scalar_one_or_none()
    if user_id is None:
        raise ValueError(f"user {username!r} already exists")
    await session.execute(
        text("INSERT INTO ops_api_tokens (user_id, token_hash) VALUES (:u, :h)"),
        {"u": user_id, "h": token_digest(token)},
    )
    return NewUser(username=username, role=role, password=password, token=token)


async def user_for_token(session: AsyncSession, token: str) -> OpsUser | None:
    row = await session.execute(
        text(
            "UPDATE ops_api_tokens t SET last_used_at = now()"
            " FROM ops_users u"
            " WHERE t.token_hash = :h AND t.revoked_at IS NULL"
            "  AND u.id = t.user_id AND u.disabled_at IS NULL"
            " RETURNING u.id, u.username, u.role"
        ),
        {"h": token_digest(token)},
    )
    found = row.first()
    return OpsUser(*found) if found else None


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
        async with services(request).sessionmaker() as session, session.begin():
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
