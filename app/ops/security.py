"""Ops identities: argon2id passwords, SHA-256-stored API tokens, and the role check every ops
endpoint declares through `require_role`, or through the aliases Viewer, Operator and Admin."""

from __future__ import annotations

import functools
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
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
from app.core.names import TENANT
from app.core.ratelimit import limit_ops_token
from app.ops import repository
from app.services import services, transaction

_RANK = {role: rank for rank, role in enumerate(ROLES)}
# The names ops_users accepts (its check constraint ck_ops_users_username).
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
log = structlog.get_logger("selfheal.ops")
_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters


# Most tenants one user's scope may list (ck_ops_users_tenants).
MAX_SCOPE_TENANTS = 100


@dataclass(frozen=True, slots=True)
class OpsUser:
    id: uuid.UUID
    username: str
    role: str
    # The tenants this user sees and acts on; None: every tenant. Every ops read and action
    # takes `scope` and filters in its SQL (`tenant_id = ANY(:tenants)`); what is outside the
    # scope does not exist for the user (404).
    tenants: tuple[str, ...] | None = None

    def can(self, role: str) -> bool:
        """At least `role`. The admin role is global (the policy, the kill switch and the ops
        users concern every tenant): a tenant-scoped user never counts as an admin (the
        database refuses a scoped admin anyway: ck_ops_users_admin_unscoped)."""
        if role == "admin" and self.tenants is not None:
            return False
        return _RANK[self.role] >= _RANK[role]

    @property
    def scope(self) -> list[str] | None:
        """The tenants for a query's `tenant_id = ANY(:tenants)`; None: no filter."""
        return None if self.tenants is None else list(self.tenants)


def scope_of(tenants: Sequence[str] | None) -> tuple[str, ...] | None:
    """A user's scope as stored (a text[] or NULL) for OpsUser.tenants."""
    return None if tenants is None else tuple(tenants)


async def check_scope(
    session: AsyncSession, role: str, tenants: Sequence[str] | None
) -> list[str] | None:
    """The scope to store for a user of `role` limited to `tenants` (None: every tenant):
    each a valid tenant id that exists, no duplicates, at least one; never for an admin."""
    if tenants is None:
        return None
    scope = list(dict.fromkeys(t.strip() for t in tenants if t.strip()))
    if not scope:
        raise Invalid("give at least one tenant, or none to see every tenant", field="tenants")
    if role == "admin":
        raise Invalid(
            "an admin sees every tenant (the policy, the kill switch and the ops users are"
            " global): a tenant-scoped user is a viewer or an operator",
            field="tenants",
        )
    if len(scope) > MAX_SCOPE_TENANTS:
        raise Invalid(f"at most {MAX_SCOPE_TENANTS} tenants per user", field="tenants")
    for tenant in scope:
        if not TENANT.match(tenant):
            raise Invalid(f"{tenant!r} is not a valid tenant id", field="tenants")
    missing = await repository.missing_tenants(session, scope)
    if missing:
        raise Invalid(
            f"no such tenant: {', '.join(missing)} (tenants exist once a plugin of theirs is"
            " registered)",
            field="tenants",
        )
    return scope


@dataclass(frozen=True, slots=True)
class NewUser:
    username: str
    role: str
    password: str
    token: str
    tenants: tuple[str, ...] | None = None
    token_expires_at: datetime | None = None


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except VerificationError:
        return False


async def add_user(
    session: AsyncSession,
    username: str,
    role: str,
    *,
    tenants: Sequence[str] | None = None,
    token_days: int | None = None,
) -> NewUser:
    """A new ops user with a generated password and API token; `tenants` limits what they see
    and act on to those tenants (None: every tenant). The token expires after `token_days`
    days (SELFHEAL_TOKEN_TTL_DAYS; None: the database's default, 90)."""
    if role not in _RANK:
        raise Invalid(f"--role must be one of {', '.join(ROLES)}", field="role")
    if not USERNAME.fullmatch(username):
        raise Invalid(
            f"{username!r} is not a valid user name (1 to 64 letters, digits, ._@-, starting"
            " with a letter or digit)",
            field="username",
        )
    scope = await check_scope(session, role, tenants)
    password = secrets.token_urlsafe(18)
    token = new_api_token()
    user_id = await repository.insert_user(
        session,
        username=username,
        role=role,
        password_hash=hash_password(password),
        tenants=scope,
    )
    if user_id is None:
        raise Conflict(f"user {username!r} already exists")
    expires_at = await repository.insert_token(
        session, user_id, token_digest(token), days=token_days
    )
    return NewUser(
        username=username,
        role=role,
        password=password,
        token=token,
        tenants=scope_of(scope),
        token_expires_at=expires_at,
    )


@dataclass(frozen=True, slots=True)
class IssuedToken:
    username: str
    token: str
    expires_at: datetime


async def _user_named(session: AsyncSession, username: str) -> Any:
    found = await repository.lock_user_by_name(session, username)
    if found is None:
        raise NotFound(f"no ops user {username!r}")
    return found


async def issue_token(session: AsyncSession, username: str, *, days: int) -> IssuedToken:
    """A new API token for the enabled user `username`, valid `days` days (shown once); the
    user's other tokens stay as they are."""
    target = await _user_named(session, username)
    if target.disabled_at is not None:
        raise Refused(f"{username} is disabled; enable them first")
    token = new_api_token()
    expires_at = await repository.insert_token(session, target.id, token_digest(token), days=days)
    log.info("ops_token_issued", user=username, expires_at=expires_at.isoformat())
    return IssuedToken(username, token, expires_at)


async def revoke_tokens_of(session: AsyncSession, username: str, token: str | None = None) -> int:
    """Revokes `token` (one of the user's) or, without it, every live token of `username`;
    how many were live. Their next request gets 401."""
    target = await _user_named(session, username)
    if token is None:
        revoked = await repository.revoke_tokens(session, target.id)
    else:
        revoked = await repository.revoke_token(session, target.id, token_digest(token.strip()))
        if not revoked:
            raise NotFound(f"that token is not a live token of {username}")
    log.info("ops_tokens_revoked", user=username, tokens_revoked=revoked)
    return revoked


async def token_refusal(session: AsyncSession, token: str) -> str:
    """Why `token` is not accepted, for the 401: expired (when), or invalid or revoked."""
    expired_at = await repository.expired_token(session, token_digest(token))
    if expired_at is None:
        return "invalid or revoked token"
    return (
        f"this API token expired at {expired_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC; ask an"
        " admin for a new one (`selfheal user issue-token <user name>`)"
    )


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
    tenants: tuple[str, ...] | None = None  # None: every tenant
    token_expires_at: datetime | None = None  # the last expiry of a live token


async def list_users(session: AsyncSession) -> list[UserListing]:
    return [
        UserListing(
            r.id,
            r.username,
            r.role,
            r.created_at,
            r.disabled_at,
            r.live_tokens,
            r.token_used_at,
            scope_of(r.tenants),
            r.token_expires_at,
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
    if role == "admin" and target.tenants is not None:
        raise Refused(
            f"{target.username} is limited to tenants {', '.join(target.tenants)}; an admin"
            " sees every tenant: give them every tenant first"
        )
    if target.role == "admin" and role != "admin" and set(admins) <= {target.id}:
        raise Refused(f"{target.username} is the last enabled admin")
    await repository.set_role(session, target.id, role)
    log.info(
        "ops_user_role_changed", actor=by.username, user=target.username, old=target.role, new=role
    )
    return OpsUser(target.id, target.username, role, scope_of(target.tenants))


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


async def set_scope(
    session: AsyncSession, by: OpsUser, user_id: uuid.UUID | str, tenants: Sequence[str] | None
) -> OpsUser:
    """Limits the user to `tenants` (None: every tenant) from their next request on (an
    admin's act); returns the user. An admin is never scoped: demote them first."""
    await set_actor(session, f"user:{by.username}")
    target = await _target(session, user_id)
    scope = await check_scope(session, target.role, tenants)
    if target.id == by.id:
        raise Refused("you cannot change your own tenants; another admin can")
    if (None if target.tenants is None else list(target.tenants)) == scope:
        raise Conflict(f"{target.username} already has this scope")
    await repository.set_tenants(session, target.id, scope)
    log.info(
        "ops_user_scope_changed",
        actor=by.username,
        user=target.username,
        old=target.tenants,
        new=scope,
    )
    return OpsUser(target.id, target.username, target.role, scope_of(scope))


async def user_for_token(session: AsyncSession, token: str) -> OpsUser | None:
    found = await repository.use_token(session, token_digest(token))
    return OpsUser(found.id, found.username, found.role, scope_of(found.tenants)) if found else None


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
    return OpsUser(found.id, found.username, found.role, scope_of(found.tenants))


# What `new_api_token` (app/core/crypto.py) makes: anything else is refused unread.
TOKEN_SHAPE = re.compile(r"sht_[A-Za-z0-9_-]{43}")


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
        if not TOKEN_SHAPE.fullmatch(token.strip()):
            # Not one of ours (sht_ and 43 URL-safe characters): refused with no database work.
            raise ApiError(
                401,
                "unauthorized",
                "this is not a selfheal API token (they start with sht_)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        # Counted per token before the token is looked up (no database work past the limit).
        svc = services(request)
        await limit_ops_token(svc.limiter, svc.settings, token.strip())
        async with transaction(request) as session:
            user = await user_for_token(session, token.strip())
            refusal = await token_refusal(session, token.strip()) if user is None else ""
        if user is None:
            raise ApiError(401, "unauthorized", refusal, headers={"WWW-Authenticate": "Bearer"})
        if not user.can(role):
            raise ApiError(403, "forbidden", f"this needs the {role} role; you are {user.role}")
        request.state.ops_user = user
        return user

    return dependency


# The dependency aliases a route declares its caller with: `user: Operator`.
Viewer = Annotated[OpsUser, Depends(require_role("viewer"))]
Operator = Annotated[OpsUser, Depends(require_role("operator"))]
Admin = Annotated[OpsUser, Depends(require_role("admin"))]
