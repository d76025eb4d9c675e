"""Dashboard sessions: a new random id at every sign-in (no session fixation), kept server-side
in PostgreSQL as its SHA-256 only, with idle and absolute timeouts; a CSRF token per session,
compared in constant time; and failed sign-ins slowed per account and per address with Redis
counters that expire."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.settings import Settings
from app.dashboard import repository
from app.ops.security import OpsUser, scope_of

COOKIE = "selfheal_session"
# The sign-in form's own CSRF token, before there is a session (double submit: cookie + field).
LOGIN_CSRF_COOKIE = "selfheal_login_csrf"


@dataclass(frozen=True, slots=True)
class SignedIn:
    user: OpsUser
    id_hash: bytes
    csrf_token: str
    flash: str | None


def id_hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


def same_token(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a CSRF token with what a form sent."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


async def start(session: AsyncSession, user: OpsUser, settings: Settings) -> str:
    """A new session for `user`; returns the id for the cookie (never stored as such)."""
    await repository.delete_expired_sessions(
        session, user.id, idle_s=settings.session_idle_s, max_s=settings.session_max_s
    )
    session_id = secrets.token_urlsafe(32)
    await repository.insert_session(
        session, id_hash=id_hash(session_id), user_id=user.id, csrf_token=secrets.token_urlsafe(32)
    )
    return session_id


async def resume(
    session: AsyncSession, session_id: str | None, settings: Settings, *, touch: bool = True
) -> SignedIn | None:
    """The signed-in user of a cookie's session id, or None (absent, unknown, timed out,
    ended, or the user disabled). `touch=False` (a page's own automatic refresh) does not
    count as activity for the idle timeout."""
    if not session_id or len(session_id) > 200:
        return None
    key = id_hash(session_id)
    row = await repository.use_session(
        session, key, idle_s=settings.session_idle_s, max_s=settings.session_max_s, touch=touch
    )
    if row is None:
        return None
    user = OpsUser(row.user_id, row.username, row.role, scope_of(row.tenants))
    return SignedIn(user, key, row.csrf_token, row.flash)


async def end(session: AsyncSession, signed_in: SignedIn) -> None:
    await repository.delete_session(session, signed_in.id_hash)


async def end_all(session: AsyncSession, user_id: uuid.UUID) -> int:
    """Ends every session of the user (a disabled user is signed out everywhere)."""
    return await repository.delete_user_sessions(session, user_id)


async def flash(session: AsyncSession, signed_in: SignedIn, message: str) -> None:
    await repository.set_flash(session, signed_in.id_hash, message[:2000])


class LoginThrottle:
    """Failed sign-ins counted per account and per client address in Redis, each counter
    expiring SELFHEAL_LOGIN_LOCKOUT_S after its first failure. Past either limit, sign-ins
    are refused (even with the right password) until the counter expires."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings

    def _keys(self, username: str, address: str) -> tuple[str, str]:
        prefix = f"{self._settings.redis_prefix}dashboard:login-failures:"
        account = hashlib.sha256(username.lower().encode()).hexdigest()
        return prefix + "account:" + account, prefix + "address:" + address

    async def retry_after_s(self, username: str, address: str) -> int | None:
        """Seconds until a sign-in is accepted again, or None when it is accepted now."""
        account, by_address = self._keys(username, address)
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in (account, by_address):
                pipe.get(key)
                pipe.ttl(key)
            account_n, account_ttl, address_n, address_ttl = await pipe.execute()
        waits = []
        if int(account_n or 0) >= self._settings.login_failures_per_account:
            waits.append(max(int(account_ttl), 1))
        if int(address_n or 0) >= self._settings.login_failures_per_address:
            waits.append(max(int(address_ttl), 1))
        return max(waits) if waits else None

    async def failed(self, username: str, address: str) -> None:
        window = self._settings.login_lockout_s
        async with self._redis.pipeline(transaction=True) as pipe:
            for key in self._keys(username, address):
                pipe.set(key, 0, ex=window, nx=True)
                pipe.incr(key)
            await pipe.execute()

    async def succeeded(self, username: str, address: str) -> None:
        """The account's count starts again; the address's does not (one address trying many
        accounts stays slowed)."""
        await self._redis.delete(self._keys(username, address)[0])
